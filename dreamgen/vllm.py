"""vLLM-aware serving: health, model checks, adaptive concurrency, replicas, a launched server.

Besides the OpenAI-compatible API, a vLLM server exposes ``/health`` (200 when the engine
is up), ``/v1/models`` (what it serves) and ``/metrics`` (Prometheus text with
``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``).
``ServerEngine`` reads all three:

- it checks ``/health`` and the model name before the first request, and keeps probing
  while a server is down (exponential backoff), so a run pauses through an outage and
  resumes by itself instead of failing;
- each server ("replica") has an ``AdaptiveLimiter``: additive increase while the server's
  queue stays short, multiplicative decrease when requests wait, the KV cache is full
  and requests are preempted, or 429/503 come back;
- requests go to the healthy replica with the most headroom, and the pipeline's in-flight
  window (``Gate``) is the sum of the healthy replicas' limits: zero during a full outage.

``Launcher`` starts ``vllm serve …`` as a child process, streams its log to a file,
restarts it with backoff when it dies and stops it (SIGTERM, then SIGKILL) on exit.
llama.cpp's server (the embedded engine) speaks the same endpoints, with its own metric
names, which are read too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dreamgen.engines import Completion, EngineError, OpenAIEngine, TransientError, _describe

log = logging.getLogger("dreamgen.vllm")


class EngineUnavailable(EngineError):
    """No server is healthy right now (an outage): the request was not sent."""


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` up to ``timeout`` seconds; True if it was set.

    ``asyncio.timeout``, not ``wait_for``: on Python 3.11 a ``wait_for`` whose timeout
    fires as the task is cancelled can swallow the cancellation, and a loop around it
    then never ends.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False


def _event(level: int, event: str, msg: str, *args: Any, **fields: Any) -> None:
    log.log(level, msg, *args, extra={"event": event, "fields": fields})


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


@dataclass
class AdaptSettings:
    """AIMD tuning; see ``AdaptiveLimiter``."""

    min_limit: int = 8
    increase: int = 8
    decrease: float = 0.8
    max_waiting: int = 8
    max_kv_usage: float = 0.97
    cooldown_s: float = 5.0


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
    otherwise one congestion episode would collapse the limit to its floor.
    With ``adaptive=False`` the limit is fixed.
    """

    def __init__(
        self,
        limit: int,
        *,
        max_limit: int | None = None,
        adaptive: bool = True,
        settings: AdaptSettings | None = None,
    ) -> None:
        self.settings = settings or AdaptSettings()
        self.max_limit = max(1, max_limit or limit)
        self.min_limit = max(1, min(self.settings.min_limit, self.max_limit))
        self.adaptive = adaptive
        self.limit = max(self.min_limit, min(limit, self.max_limit))
        self.inflight = 0
        self.increases = 0
        self.decreases = 0
        self._last_decrease = -1e9
        self._last_preemptions: float | None = None

    def set_max(self, max_limit: int) -> None:
        """A new ceiling (config reload): a fixed limit follows it, an adaptive one is capped."""
        self.max_limit = max(1, max_limit)
        self.min_limit = max(1, min(self.settings.min_limit, self.max_limit))
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
            self.increases += 1
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


# ---------------------------------------------------------------------------------------
# Replicas
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Replica:
    """One server and what is known about it."""

    url: str
    client: OpenAIEngine
    limiter: AdaptiveLimiter
    state: str = "unknown"  # unknown | up | down
    reason: str = "not checked yet"
    model_ok: bool = False
    metrics_ok: bool = True
    load: ServerLoad | None = None
    failures: int = 0  # consecutive failed probes
    next_check: float = 0.0
    down_since: float | None = None
    outages: int = 0
    requests: int = 0
    errors: int = 0
    last_status: dict[str, Any] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.state == "up"

    @property
    def inflight(self) -> int:
        return self.limiter.inflight


class ServerEngine:
    """OpenAI-compatible servers (vLLM or llama.cpp), health- and load-aware.

    ``servers``: base URLs of replicas serving ``model``; ``concurrency``: the in-flight
    limit per server (the ceiling when ``adaptive``). ``start(wait=True)`` waits out a down
    server (a daemon); ``start(wait=False)`` fails fast with one clear line (a build).
    """

    def __init__(
        self,
        servers: list[str],
        model: str,
        *,
        name: str = "openai",
        api_key: str | None = None,
        concurrency: int = 256,
        hard_cap: int | None = None,
        adaptive: bool = False,
        adapt: AdaptSettings | None = None,
        start_limit: int | None = None,
        timeout_s: float = 600.0,
        max_attempts: int = 6,
        health_interval_s: float = 2.0,
        backoff_max_s: float = 30.0,
        guided: str = "response_format",
        launcher: Launcher | None = None,
    ) -> None:
        if not servers:
            raise EngineError("no server URL given")
        self.name = name
        self.model = model
        self.adaptive = adaptive
        self.hard_cap = hard_cap
        self.health_interval_s = health_interval_s
        self.backoff_max_s = max(backoff_max_s, health_interval_s)
        self.guided = guided
        self.launcher = launcher
        ceiling = min(concurrency, hard_cap) if hard_cap else concurrency
        self.replicas = [
            Replica(
                url=url.rstrip("/").removesuffix("/v1"),
                client=OpenAIEngine(
                    url,
                    model,
                    api_key=api_key,
                    concurrency=ceiling,
                    timeout_s=timeout_s,
                    max_attempts=max_attempts,
                ),
                limiter=AdaptiveLimiter(
                    start_limit or ceiling, max_limit=ceiling, adaptive=adaptive, settings=adapt
                ),
            )
            for url in servers
        ]
        for r in self.replicas:
            r.client.on_retry = self._retry_hook(r)
        self.gate = Gate(self._capacity)
        self.outages = 0  # times the whole engine went from ready to not ready
        self.ready_since: float | None = None
        self.down_since: float | None = time.monotonic()
        self._probe_session: aiohttp.ClientSession | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._was_ready = False

    def __repr__(self) -> str:
        return f"ServerEngine({[r.url for r in self.replicas]!r}, model={self.model!r})"

    # -- state ---------------------------------------------------------------------------

    def _capacity(self) -> int:
        return sum(r.limiter.limit for r in self.replicas if r.up)

    @property
    def ready(self) -> bool:
        return any(r.up for r in self.replicas)

    @property
    def limit(self) -> int:
        return self._capacity()

    @property
    def retries(self) -> int:
        return sum(r.client.retries for r in self.replicas)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.replicas)

    def reason(self) -> str:
        """Why the engine is not ready (empty when it is)."""
        if self.ready:
            return ""
        reasons = "; ".join(r.reason for r in self.replicas)
        if self.launcher is not None and self.launcher.state != "running":
            reasons = f"launched server {self.launcher.state}; {reasons}"
        return reasons

    def status(self) -> list[dict[str, Any]]:
        """Per-server state for /readyz and metrics."""
        return [
            {
                "url": r.url,
                "state": r.state,
                "reason": "" if r.up else r.reason,
                "limit": r.limiter.limit,
                "inflight": r.inflight,
                "requests": r.requests,
                "errors": r.errors,
                "outages": r.outages,
                "running": r.load.running if r.load else None,
                "waiting": r.load.waiting if r.load else None,
                "kv_usage": r.load.kv_usage if r.load else None,
            }
            for r in self.replicas
        ]

    def set_concurrency(self, concurrency: int) -> None:
        """Apply a reloaded ``concurrency`` (per server)."""
        ceiling = min(concurrency, self.hard_cap) if self.hard_cap else concurrency
        for r in self.replicas:
            r.limiter.set_max(ceiling)
        self.gate.notify()

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> ServerEngine:
        await self.start(wait=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait: bool = False, timeout_s: float | None = None) -> None:
        """Open clients and check every server; see the class docstring for ``wait``."""
        for r in self.replicas:
            await r.client.start()
        self._probe_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10, sock_connect=5)
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        logged = ""
        while True:
            await asyncio.gather(*(self._probe(r) for r in self.replicas))
            self._after_probes()
            if self.ready:
                break
            launcher_failed = self.launcher is not None and self.launcher.failed
            if not wait or launcher_failed:
                await self.close()
                if launcher_failed and self.launcher is not None:
                    raise EngineError(self.launcher.failure_message())
                raise EngineError(self.reason())
            if deadline is not None and time.monotonic() > deadline:
                await self.close()
                raise EngineError(f"no server became ready within {timeout_s:g}s: {self.reason()}")
            if self.reason() != logged:
                logged = self.reason()
                _event(logging.WARNING, "not_ready", "waiting for the server: %s", logged)
            delay = min(r.next_check for r in self.replicas) - time.monotonic()
            await asyncio.sleep(max(0.05, min(delay, self.backoff_max_s)))
        self._monitor_task = asyncio.create_task(self._monitor())

    async def close(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        for r in self.replicas:
            await r.client.close()
        if self._probe_session is not None:
            await self._probe_session.close()
            self._probe_session = None

    # -- requests ------------------------------------------------------------------------

    def _pick(self) -> Replica | None:
        up = [r for r in self.replicas if r.up]
        if not up:
            return None
        # Most free slots first (relative to each server's limit); random among ties.
        best = max(1.0 - r.inflight / max(1, r.limiter.limit) for r in up)
        return random.choice([r for r in up if 1.0 - r.inflight / max(1, r.limiter.limit) == best])

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        r = self._pick()
        if r is None:
            raise EngineUnavailable(f"no server is ready: {self.reason()}")
        if self.guided == "structured_outputs" and response_format is not None:
            # vLLM's own field (>= 0.10.2); response_format works on every server.
            schema = response_format.get("json_schema", {}).get("schema")
            sampling = {**(sampling or {}), "structured_outputs": {"json": schema}}
            response_format = None
        r.limiter.inflight += 1
        r.requests += 1
        try:
            return await r.client.chat(messages, response_format=response_format, sampling=sampling)
        except EngineError as exc:
            r.errors += 1
            if isinstance(exc.__cause__, TransientError) and r.client.on_retry is not None:
                r.client.on_retry(exc.__cause__)  # the last failure was not retried
            if "HTTP 404" in str(exc):
                r.model_ok = False  # the model went away: re-check /v1/models
            self._suspect(r)
            raise
        finally:
            r.limiter.inflight -= 1

    def _retry_hook(self, r: Replica) -> Callable[[BaseException | None], None]:
        def hook(exc: BaseException | None) -> None:
            if isinstance(exc, TransientError):
                if exc.status in (429, 503) and r.up and r.limiter.on_overload():
                    self.gate.notify()
                if exc.status is None or exc.status == 503:
                    self._suspect(r)  # connection failure or unavailable: probe it now

        return hook

    def _suspect(self, r: Replica) -> None:
        if r.up:
            r.next_check = 0.0
            self._wake.set()

    # -- health --------------------------------------------------------------------------

    async def _get(self, url: str) -> tuple[int, bytes]:
        assert self._probe_session is not None
        async with self._probe_session.get(url) as resp:
            return resp.status, await resp.read()

    async def _probe(self, r: Replica) -> None:
        """One health check (and metrics scrape) of one server; updates its state."""
        try:
            status, _ = await self._get(f"{r.url}/health")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._mark_down(r, f"cannot reach {r.url}: {_describe(exc)}")
            return
        if status not in (200, 404):  # 404: a server without /health; /v1/models decides
            self._mark_down(r, f"{r.url}/health answered HTTP {status}")
            return
        if not r.model_ok or not r.up:
            try:
                served = await r.client.served_models()
            except EngineError as exc:
                self._mark_down(r, str(exc))
                return
            if self.model not in served:
                self._mark_down(
                    r,
                    f"model {self.model!r} is not served by {r.url}; it serves: "
                    + (", ".join(served) or "nothing"),
                )
                return
            r.model_ok = True
        self._mark_up(r)
        if r.metrics_ok:
            await self._scrape(r)

    async def _scrape(self, r: Replica) -> None:
        try:
            status, body = await self._get(f"{r.url}/metrics")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return  # /health passed: a failed scrape alone is not an outage
        if status != 200:
            if status == 404:
                r.metrics_ok = False
                log.info("%s has no /metrics: concurrency stays fixed", r.url)
            return
        try:
            load = parse_metrics(body.decode(errors="replace"))
        except ValueError:
            load = None
        if load is None:
            return
        r.load = load
        before = r.limiter.limit
        change = r.limiter.on_load(load)
        if change is not None:
            log.debug(
                "%s: %s concurrency %d -> %d (running %g, waiting %g, kv %s)",
                r.url, change, before, r.limiter.limit, load.running, load.waiting, load.kv_usage,
            )  # fmt: skip
        if change == "increase":
            self.gate.notify()

    def _mark_up(self, r: Replica) -> None:
        r.failures = 0
        r.next_check = time.monotonic() + self.health_interval_s
        if r.state != "up":
            was = r.state
            r.state, r.reason = "up", ""
            if was == "down" and r.down_since is not None:
                took = time.monotonic() - r.down_since
                _event(
                    logging.WARNING, "server_up", "%s is back after %.1fs", r.url, took,
                    server=r.url, outage_s=round(took, 2),
                )  # fmt: skip
            else:
                _event(logging.INFO, "server_up", "%s is ready", r.url, server=r.url)
            r.down_since = None
            self.gate.notify()

    def _mark_down(self, r: Replica, reason: str) -> None:
        r.failures += 1
        r.model_ok = False if "not served" in reason else r.model_ok
        delay = min(self.backoff_max_s, self.health_interval_s * 2 ** (r.failures - 1))
        r.next_check = time.monotonic() + delay * random.uniform(0.8, 1.0)
        if r.state != "down" or r.reason != reason:
            # The first probe's failure is start()'s to report (a build fails with one line).
            level = logging.DEBUG if r.state == "unknown" else logging.WARNING
            if r.state == "up":
                r.outages += 1
                r.down_since = time.monotonic()
            elif r.down_since is None:
                r.down_since = time.monotonic()
            _event(
                level, "server_down", "%s is not ready: %s", r.url, reason,
                server=r.url, reason=reason,
            )  # fmt: skip
        r.state, r.reason = "down", reason
        r.load = None

    def _after_probes(self) -> None:
        ready = self.ready
        if ready and not self._was_ready:
            self.ready_since, self.down_since = time.monotonic(), None
        elif not ready and self._was_ready:
            self.outages += 1
            self.ready_since, self.down_since = None, time.monotonic()
        self._was_ready = ready

    async def _monitor(self) -> None:
        """Probe each server when due: every interval while up, with backoff while down."""
        while True:
            now = time.monotonic()
            due = [r for r in self.replicas if r.next_check <= now]
            if due:
                await asyncio.gather(*(self._probe(r) for r in due))
                self._after_probes()
            wait = min(r.next_check for r in self.replicas) - time.monotonic()
            self._wake.clear()
            await wait_event(self._wake, max(0.05, wait))


# ---------------------------------------------------------------------------------------
# Launched server
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchInfo:
    """What a ``vllm serve`` command line says about where and what it serves."""

    argv: list[str]
    host: str
    port: int
    model: str | None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def parse_launch(command: str) -> LaunchInfo:
    """Split a launch command and find its host, port and served model name.

    ``vllm serve MODEL [--host H] [--port P] [--served-model-name NAME]`` (vLLM's defaults:
    port 8000); other commands are taken as they are, with ``--host/--port`` if present.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"launch command: {exc}") from exc
    if not argv:
        raise ValueError("launch command is empty")
    opts: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            if eq:
                opts[key] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                opts[key] = argv[i + 1]
                i += 1
            else:
                opts[key] = ""
        else:
            positional.append(a)
        i += 1
    try:
        port = int(opts.get("port", "8000"))
    except ValueError as exc:
        raise ValueError(f"launch command: --port {opts['port']!r} is not a number") from exc
    model = opts.get("served-model-name") or opts.get("model")
    is_vllm_serve = len(positional) >= 3 and Path(positional[0]).name == "vllm"
    if model is None and is_vllm_serve and positional[1] == "serve":
        model = positional[2]
    return LaunchInfo(argv=argv, host=opts.get("host", "127.0.0.1"), port=port, model=model)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if dreamgen dies without stopping it (SIGKILL, crash)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Launcher:
    """Start a server command as a child and keep it running.

    The child gets its own process group (its workers are stopped with it); its stdout
    and stderr go to ``log_path`` (appended, one header line per start). When it exits
    unasked, it is restarted after a backoff that doubles with each quick death (one that
    ran less than ``stable_s``) up to ``backoff_max_s``. ``max_failures`` quick deaths
    in a row give up (``failed``); None never gives up (a daemon). ``stop`` sends SIGTERM
    to the group, then SIGKILL after ``stop_grace_s``.
    """

    def __init__(
        self,
        command: str | list[str],
        *,
        log_path: Path,
        stop_grace_s: float = 30.0,
        backoff_s: float = 2.0,
        backoff_max_s: float = 120.0,
        stable_s: float = 60.0,
        max_failures: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        self.log_path = Path(log_path)
        self.stop_grace_s = stop_grace_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.max_failures = max_failures
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.restarts = 0
        self.failures = 0  # quick deaths in a row
        self.last_exit: int | None = None
        self.state = "stopped"  # stopped | running | restarting | failed
        self.started_at = 0.0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._stop_event = asyncio.Event()

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def failure_message(self) -> str:
        tail = self.log_tail(3)
        last = f"; last log lines: {' | '.join(tail)}" if tail else ""
        return (
            f"the launched server ({shlex.join(self.argv[:3])} …) exited {self.failures} times "
            f"(last exit code {self.last_exit}); see {self.log_path}{last}"
        )

    def log_tail(self, n: int) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("=== ")][-n:]

    async def start(self) -> None:
        """Start the child and its supervisor; raises EngineError if it cannot be spawned."""
        self._stopping = False
        self._stop_event.clear()
        await self._spawn()
        self._task = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as logf:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            header = f"=== dreamgen: start {self.starts} at {stamp}: {shlex.join(self.argv)}\n"
            logf.write(header.encode())
            logf.flush()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    env=self.env,
                )
            except OSError as exc:
                self.state = "failed"
                raise EngineError(f"cannot launch {self.argv[0]!r}: {exc.strerror or exc}") from exc
        self.started_at = time.monotonic()
        self.state = "running"
        _event(
            logging.INFO, "server_launched", "launched server pid %d (log: %s)",
            self.proc.pid, self.log_path, pid=self.proc.pid, log=str(self.log_path),
        )  # fmt: skip

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                break
            self.last_exit = code
            ran = time.monotonic() - self.started_at
            self.failures = 0 if ran >= self.stable_s else self.failures + 1
            if self.max_failures is not None and self.failures >= self.max_failures:
                self.state = "failed"
                _event(logging.ERROR, "server_failed", "%s", self.failure_message(), code=code)
                return
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, self.failures - 1))
            self.state = "restarting"
            _event(
                logging.WARNING, "server_exited",
                "launched server exited with code %s after %.1fs; restarting in %.1fs",
                code, ran, delay, code=code, ran_s=round(ran, 2), restart_in_s=round(delay, 2),
            )  # fmt: skip
            await wait_event(self._stop_event, delay)
            if self._stopping:
                break
            try:
                await self._spawn()
            except EngineError as exc:
                _event(logging.ERROR, "server_failed", "%s", exc)
                return
            self.restarts += 1

    async def wait_healthy(self, url: str, timeout_s: float, interval_s: float = 0.5) -> None:
        """Poll ``url``/health until 200; EngineError on timeout or when the launcher gave up."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while True:
                if self.failed:
                    raise EngineError(self.failure_message())
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with s.get(f"{url.rstrip('/')}/health") as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the launched server did not answer {url}/health within {timeout_s:g}s; "
                        f"see {self.log_path}"
                    )
                await asyncio.sleep(interval_s)

    async def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM the child's process group, SIGKILL after the grace; returns its exit code."""
        self._stopping = True
        self._stop_event.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        proc = self.proc
        self.state = "stopped"
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        grace = self.stop_grace_s if grace_s is None else grace_s
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                code = await proc.wait()
        except TimeoutError:
            _event(
                logging.WARNING, "server_killed",
                "launched server ignored SIGTERM for %.1fs: SIGKILL", grace,
            )  # fmt: skip
            _signal_group(proc.pid, signal.SIGKILL)
            code = await proc.wait()
        _event(logging.INFO, "server_stopped", "launched server stopped (code %s)", code, code=code)
        return code


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
