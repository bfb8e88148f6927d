"""The engine contract: what the pipeline, the daemon and the metrics read from an engine.

Every capability is declared here with a default, so callers read attributes instead of
probing for them: an engine without servers is always ``ready``, has no ``gate`` (the
pipeline keeps a fixed window), no ``launcher``, no per-server ``status`` and counts no
retries or outages. An engine overrides what it has; only ``chat`` is required.

Also here: the one ``Completion`` every engine returns, and the engine errors.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from dreamgen.scenario import Dialect

if TYPE_CHECKING:
    from dreamgen.engines.launcher import Launcher
    from dreamgen.engines.limits import Gate


class EngineError(Exception):
    """The engine cannot serve us (bad URL, wrong model, retries exhausted): not retried."""


class TransientError(Exception):
    """A failure worth retrying: 429, 5xx, timeouts, connection errors."""

    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status  # HTTP status; None for connection failures and timeouts


class EngineUnavailable(EngineError):
    """No server is healthy right now (an outage): the request was not sent."""


@dataclass(slots=True)
class Completion:
    """One chat completion, reduced to what the pipeline uses."""

    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


class Engine(abc.ABC):
    """What the pipeline needs from an engine; ``async with engine`` starts and closes it."""

    name: str  # recorded in each record's provenance
    model: str
    # The live in-flight window (it adapts to load, and is zero during an outage);
    # None: the pipeline keeps a fixed window of ``concurrency``.
    gate: Gate | None = None
    # The server process this engine started and supervises, if any.
    launcher: Launcher | None = None
    # Monotonic time since no server has been ready; None while ready.
    down_since: float | None = None
    # Times the engine went from ready to not ready.
    outages: int = 0
    # How the model-facing schemas are rendered for this engine's grammar engine
    # (``dreamgen.scenario.schema_for``): llama.cpp's small model needs string bounds;
    # vLLM's xgrammar decodes ~1.5-2x slower with them (bench/xgrammar_schemas.py).
    schema_dialect: Dialect = "bounded"

    @property
    def ready(self) -> bool:
        """Whether a request sent now can be served (False during an outage)."""
        return True

    @property
    def retries(self) -> int:
        """Requests retried after a transient failure, in all."""
        return 0

    @property
    def server_errors(self) -> int:
        """HTTP 429 and 5xx answers received, in all (retried or not)."""
        return 0

    def reason(self) -> str:
        """Why the engine is not ready (empty when it is)."""
        return "" if self.ready else "engine not ready"

    def status(self) -> list[dict[str, Any]] | None:
        """Per-server state for /readyz and metrics; None for an engine without servers."""
        return None

    def set_concurrency(self, concurrency: int) -> None:
        """Apply a reloaded ``concurrency``; an engine without a gate has nothing to change."""
        return None

    async def start(self) -> None:
        """Get ready to serve; raises EngineError with one clear line if it cannot."""
        return None

    async def close(self) -> None:
        """Release what ``start`` took; safe to call more than once."""
        return None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        """One chat completion; raises EngineError when it cannot be had."""
