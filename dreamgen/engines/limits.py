"""A server's load and the in-flight limits that follow it.

A vLLM server's ``/metrics`` is Prometheus text with ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``; llama.cpp's server (the
embedded engine) has its own names, which are read too. Each server gets an
``AdaptiveLimiter`` (AIMD, tuned by the config's ``[adapt]``: additive increase while the
server's queue stays short, multiplicative decrease when requests wait, the KV cache is
full and requests are preempted, or 429/503 come back), and the pipeline's in-flight
window is a ``Gate`` whose limit is a function: the sum of the healthy servers' limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from dreamgen.config import AdaptConfig

# The log name predates this package; log queries match on it.
log = logging.getLogger("dreamgen.vllm")

# ---------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------

# vLLM's names first; llama.cpp's (the embedded engine) as fallbacks.
_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")
_PREEMPT = ("vllm:num_preemptions",)


@dataclass(slots=True)
class ServerLoad:
    """One scrape of a server's load (summed over its engines)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float | None = None
    preemptions: float | None = None  # a counter: compare two scrapes


def parse_metrics(text: str) -> ServerLoad | None:
    """Read running/waiting/KV/preemptions from Prometheus text; None if none are there."""
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            values.setdefault(name, []).append(float(sample.value))

    def first(names: tuple[str, ...], agg: Callable[[list[float]], float]) -> float | None:
        for n in names:
            if values.get(n):
                return agg(values[n])
        return None

    running = first(_RUNNING, sum)
    waiting = first(_WAITING, sum)
    if running is None and waiting is None:
        return None
    return ServerLoad(
        running=running or 0.0,
        waiting=waiting or 0.0,
        kv_usage=first(_KV, max),
        preemptions=first(_PREEMPT, sum),
    )


# ---------------------------------------------------------------------------------------
# Adaptive concurrency
# ---------------------------------------------------------------------------------------


class AdaptiveLimiter:
    """AIMD limit on the requests in flight to one server.

    On each ``/metrics`` scrape (``on_load``):

    - *decrease* (``limit *= decrease``) when more than ``max_waiting`` requests wait in the
      server's queue, or the KV cache is at ``max_kv_usage`` while requests wait or get
      preempted;
    - *increase* (``limit += increase``) when the queue is short, the KV cache has room and
      the limit is in use (in flight at 80% of it or more): a limit nobody uses proves
      nothing;
    - otherwise hold.

    429/503 answers decrease too (``on_overload``). A decrease takes effect only as requests
    finish (tens of seconds for long generations), so after one the limiter waits until
    in-flight has come down to the new limit, or ``cooldown_s``, before decreasing again —
    otherwise one congestion episode would collapse the limit to its floor
    (``min_concurrency``). The knobs are the config's ``AdaptConfig``; its ``start`` is the
    caller's to pass as ``limit``. With ``adaptive=False`` the limit is fixed.
    """

    def __init__(
        self,
        limit: int,
        *,
        max_limit: int | None = None,
        adaptive: bool = True,
        settings: AdaptConfig | None = None,
    ) -> None:
        self.settings = settings if settings is not None else AdaptConfig()
        self.max_limit = max(1, max_limit or limit)
        self.min_limit = max(1, min(self.settings.min_concurrency, self.max_limit))
        self.adaptive = adaptive
        self.limit = max(self.min_limit, min(limit, self.max_limit))
        self.inflight = 0
        self.decreases = 0
        self._last_decrease = -1e9
        self._last_preemptions: float | None = None

    def set_max(self, max_limit: int) -> None:
        """A new ceiling (config reload): a fixed limit follows it, an adaptive one is capped."""
        self.max_limit = max(1, max_limit)
        self.min_limit = max(1, min(self.settings.min_concurrency, self.max_limit))
        self.limit = self.max_limit if not self.adaptive else min(self.limit, self.max_limit)

    def _decrease(self, why: str, now: float) -> bool:
        recent = now - self._last_decrease < self.settings.cooldown_s
        if recent and self.inflight > self.limit:
            return False  # the last decrease has not taken effect yet
        new = max(self.min_limit, int(self.limit * self.settings.decrease))
        self._last_decrease = now
        if new == self.limit:
            return False
        log.debug("concurrency %d -> %d (%s)", self.limit, new, why)
        self.limit = new
        self.decreases += 1
        return True

    def on_overload(self, now: float | None = None) -> bool:
        """A 429/503: the server is shedding load."""
        if not self.adaptive:
            return False
        return self._decrease("server overloaded", time.monotonic() if now is None else now)

    def on_load(self, load: ServerLoad, now: float | None = None) -> str | None:
        """Adjust to one scrape; returns "increase", "decrease" or None."""
        if not self.adaptive:
            return None
        now = time.monotonic() if now is None else now
        s = self.settings
        preempted = False
        if load.preemptions is not None:
            last, self._last_preemptions = self._last_preemptions, load.preemptions
            preempted = last is not None and load.preemptions > last
        kv_full = load.kv_usage is not None and load.kv_usage >= s.max_kv_usage
        if load.waiting > s.max_waiting or (kv_full and (load.waiting > 0 or preempted)):
            return "decrease" if self._decrease("requests waiting", now) else None
        in_use = self.inflight > 0 and self.inflight >= 0.8 * self.limit
        if not kv_full and in_use and self.limit < self.max_limit:
            self.limit = min(self.max_limit, self.limit + s.increase)
            return "increase"
        return None


class Gate:
    """The pipeline's in-flight window; its limit is a function (it changes under load)."""

    def __init__(self, capacity: Callable[[], int]) -> None:
        self.capacity = capacity
        self.inflight = 0
        self._changed = asyncio.Event()

    @property
    def limit(self) -> int:
        return self.capacity()

    def try_acquire(self) -> bool:
        if self.inflight < self.capacity():
            self.inflight += 1
            return True
        return False

    async def acquire(self) -> None:
        while not self.try_acquire():
            self._changed.clear()
            await self._changed.wait()

    def release(self) -> None:
        self.inflight -= 1
        self._changed.set()

    def notify(self) -> None:
        """The capacity may have grown: wake waiters to re-check."""
        self._changed.set()

    async def acquire_unless(
        self, stopped: Callable[[], bool], wakeup: asyncio.Event, waited: Callable[[], None]
    ) -> bool:
        """Wait for a slot; False, holding none, once ``stopped()``. It is checked whenever
        ``wakeup`` is set and at least every second, after ``waited()`` (a caller's own
        check, such as how long the server has been down)."""
        while not stopped():
            if self.try_acquire():
                return True
            acquire = asyncio.create_task(self.acquire())
            woken = asyncio.create_task(wakeup.wait())
            await asyncio.wait({acquire, woken}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            if not acquire.done():
                acquire.cancel()
                await asyncio.gather(acquire, return_exceptions=True)
            if acquire.done() and not acquire.cancelled():
                if stopped():
                    self.release()
                    return False
                return True
            waited()
        return False
