"""A run's counts: what the progress display, the manifest and the CLI summary show.

Throughput is reported as useful output (accepted records/s, accepted tokens/s) beside raw
generated tokens/s, so yield losses show (DESIGN.md).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dreamgen.engines.base import Completion


# The counters a manifest's totals add up over every run into one folder.
TOTALS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "accepted_tokens",
    "judge_requests",
    "judge_prompt_tokens",
    "judge_completion_tokens",
)


@dataclass
class Summary:
    """Counts for one run, plus the totals the store already held when it started."""

    target: int | None
    resumed: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted_tokens: int = 0
    minimal_pairs: int = 0  # derived variants written beside accepted records
    engine_errors: int = 0
    judge_requests: int = 0  # the judge's own calls and tokens, counted apart
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    coverage: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "target"

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def total(self) -> int:
        return self.resumed + self.accepted

    def add_judge(self, completions: Sequence[Completion]) -> None:
        """Count one record's judge calls apart from generation: both orders are asked,
        whether or not an answer came back (``completions``: those that did)."""
        self.judge_requests += 2
        self.judge_prompt_tokens += sum(c.prompt_tokens for c in completions)
        self.judge_completion_tokens += sum(c.completion_tokens for c in completions)

    def totals(self, base: dict[str, Any]) -> dict[str, Any]:
        """The manifest's totals: ``base`` (what earlier runs counted) plus this run."""
        out: dict[str, Any] = {"rejected": dict(sorted(self.rejected.items()))}
        for key in TOTALS:
            out[key] = base.get(key, 0) + getattr(self, key)
        return out

    def as_dict(self) -> dict[str, Any]:
        el = max(self.elapsed_s, 1e-9)
        return {
            "target": self.target,
            "resumed": self.resumed,
            "accepted": self.accepted,
            "total": self.total,
            "rejected": dict(sorted(self.rejected.items())),
            "requests": self.requests,
            "yield": round(self.accepted / self.requests, 4) if self.requests else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "accepted_tokens": self.accepted_tokens,
            "minimal_pairs": self.minimal_pairs,
            "judge_requests": self.judge_requests,
            "judge_prompt_tokens": self.judge_prompt_tokens,
            "judge_completion_tokens": self.judge_completion_tokens,
            "elapsed_s": round(el, 2),
            "accepted_per_s": round(self.accepted / el, 3),
            "accepted_tokens_per_s": round(self.accepted_tokens / el, 1),
            "completion_tokens_per_s": round(self.completion_tokens / el, 1),
            "stopped_by": self.stopped_by,
        }
