"""The yield circuit breaker: a run whose every answer is rejected stops instead of spinning.

A server that answers every request with malformed JSON (or the same scenario again, or
text the schema cannot hold) never trips an engine error: each request "succeeds" and
is rejected downstream, so a build used to run forever at yield 0. The breaker watches
finished answers (rejected or kept; engine errors and surplus are not answers) and opens
when either

- ``max_without_accept`` answers in a row were all rejected, or
- over the last ``window`` answers, fewer than ``min_yield`` of them were kept.

A build then stops with one line naming the top rejection reasons; a daemon goes
not-ready, pauses with a doubling backoff and tries again (see ``Run``).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class YieldError(Exception):
    """A build stopped because (almost) nothing it generated was accepted."""


class BreakerConfig(BaseModel):
    """``[breaker]``: when a run counts as hopeless; on by default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(True, description="off: a run never stops for its yield")
    max_without_accept: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        300, description="this many answers in a row rejected: stop"
    )
    window: Annotated[int, Field(ge=10, le=10_000_000)] = Field(
        2000, description="answers the yield bound looks back over"
    )
    min_yield: Annotated[float, Field(ge=0, le=1)] = Field(
        0.005, description="kept share over the window below this: stop (0: never)"
    )
    backoff_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        30.0, description="daemon: first pause once open (doubles on each reopen)"
    )
    backoff_max_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        900.0, description="daemon: longest pause"
    )


class YieldBreaker:
    """Counts finished answers; ``observe`` returns why it opened, once, when it does."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.streak = 0  # answers rejected since the last kept one
        self.streak_reasons: Counter[str] = Counter()
        self.recent: deque[str | None] = deque(maxlen=config.window)  # None: kept
        self.recent_reasons: Counter[str] = Counter()
        self.trips = 0  # times it opened (a daemon's backoff doubles with it)

    def observe(self, reason: str | None) -> str | None:
        """One finished answer: ``reason`` is why it was rejected, None if kept."""
        if not self.config.enabled:
            return None
        if len(self.recent) == self.recent.maxlen:
            old = self.recent[0]
            if old is not None:
                self.recent_reasons[old] -= 1
        self.recent.append(reason)
        if reason is None:
            self.streak = 0
            self.streak_reasons.clear()
            self.trips = 0  # it works again: the next pause starts short
            return None
        self.recent_reasons[reason] += 1
        self.streak += 1
        self.streak_reasons[reason] += 1
        if self.streak >= self.config.max_without_accept:
            return self._open(f"{self.streak} answers in a row were rejected", self.streak_reasons)
        full = len(self.recent) == self.recent.maxlen
        kept = len(self.recent) - sum(self.recent_reasons.values())
        if full and self.config.min_yield > 0 and kept < self.config.min_yield * len(self.recent):
            return self._open(
                f"only {kept} of the last {len(self.recent)} answers were kept "
                f"(breaker.min_yield {self.config.min_yield:g})",
                self.recent_reasons,
            )
        return None

    def _open(self, what: str, reasons: Counter[str]) -> str:
        self.trips += 1
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3) if n > 0)
        message = f"{what}; top rejection reasons: {top}"
        self.reset()
        return message

    def reset(self) -> None:
        """Forget the answers seen (after a pause, the run starts counting afresh)."""
        self.streak = 0
        self.streak_reasons.clear()
        self.recent.clear()
        self.recent_reasons.clear()

    def pause_s(self) -> float:
        """How long a daemon waits after the latest opening."""
        c = self.config
        return min(c.backoff_max_s, c.backoff_s * 2 ** max(0, min(self.trips - 1, 20)))
