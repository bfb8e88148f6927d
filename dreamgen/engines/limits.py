"""A server's load and the in-flight limits that follow it.

A vLLM server's ``/metrics`` is Prometheus text with ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``; llama.cpp's server (the
embedded engine) has its own names, which are read too. Each server gets an
``AdaptiveLimiter`` (tuned by the config's ``[adapt]``: it holds the server at its running
count plus a short queue, grows while nothing waits, shrinks on preemptions and 429/503),
and the pipeline's in-flight window is a ``Gate`` whose limit is a function: the sum of
the healthy servers' limits.
"""

from __future__ import annotations

import asyncio
import logging
import math
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
    """The limit on requests in flight to one server, following its ``/metrics``.

    The aim is a server whose slots never idle and whose queue stays short: a few requests
    waiting, so a slot that frees is refilled at once, and no more (a long queue only adds
    latency and hides a dead server's backlog). On each scrape (``on_load``):

    - *requests wait* (the server is saturated; its running count is its slot count):
      the limit becomes running + a short queue (``min_waiting``, or ``headroom`` of the
      running count if more) — down when too many wait, up when too few;
    - *preemptions* (vLLM evicted running requests: the KV cache is over-committed): the
      limit shrinks by ``decrease``, never below the running count;
    - *nothing waits, the limit is in use and the KV cache has room* (slots may idle):
      it grows by ``growth`` of itself (at least ``increase``), so it finds a server's slot
      count in a few scrapes whether that is 16 or 1024, and again if the count changes;
    - otherwise hold.

    429/503 answers shrink it by ``decrease`` too (``on_overload``), at most once per
    ``cooldown_s`` while in-flight is still above the last cut (a cut takes effect only as
    requests finish). The limit stays within [``min_concurrency``, ``max_limit``]; the
    knobs are the config's ``AdaptConfig``; its ``start`` is the caller's to pass as
    ``limit``. With ``adaptive=False`` the limit is fixed.
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

    def _set(self, limit: int, why: str) -> str | None:
        new = max(self.min_limit, min(limit, self.max_limit))
        if new == self.limit:
            return None
        change = "increase" if new > self.limit else "decrease"
        log.debug("concurrency %d -> %d (%s)", self.limit, new, why)
        self.limit = new
        if change == "decrease":
            self.decreases += 1
        return change

    def _cut(self, why: str, now: float, floor: int = 0) -> str | None:
        recent = now - self._last_decrease < self.settings.cooldown_s
        if recent and self.inflight > self.limit:
            return None  # the last cut has not taken effect yet
        self._last_decrease = now
        return self._set(max(floor, int(self.limit * self.settings.decrease)), why)

    def on_overload(self, now: float | None = None) -> bool:
        """A 429/503: the server is shedding load."""
        if not self.adaptive:
            return False
        now = time.monotonic() if now is None else now
        return self._cut("server overloaded", now) is not None

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
        running = int(load.running)
        if preempted:
            return self._cut("preemptions", now, floor=running)
        if load.waiting > 0:
            queue = max(s.min_waiting, math.ceil(s.headroom * running))
            return self._set(running + queue, "saturated: running plus a short queue")
        kv_full = load.kv_usage is not None and load.kv_usage >= s.max_kv_usage
        in_use = self.inflight > 0 and self.inflight >= 0.8 * self.limit
        if in_use and not kv_full:
            step = max(s.increase, math.ceil(s.growth * self.limit))
            return self._set(self.limit + step, "nothing waits")
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
