"""The server engine: OpenAI-compatible servers (vLLM, llama.cpp), health- and load-aware.

Besides the OpenAI-compatible API, a vLLM server exposes ``/health`` (200 when the engine
is up), ``/v1/models`` (what it serves) and ``/metrics`` (its load, see ``limits``).
``ServerEngine`` reads all three:

- it checks ``/health`` and the model name before the first request, and keeps probing
  while a server is down (exponential backoff), so a run pauses through an outage and
  resumes by itself instead of failing;
- each server ("replica") has an ``AdaptiveLimiter`` that follows its load;
- requests go to the healthy replica with the most headroom, and the pipeline's in-flight
  window (``Gate``) is the sum of the healthy replicas' limits: zero during a full outage.

llama.cpp's server (the embedded engine) speaks the same endpoints. A server started by
dreamgen itself is supervised by a ``Launcher``, whose state the engine reports.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from dreamgen.config import AdaptConfig
from dreamgen.engines.aio import wait_event
from dreamgen.engines.base import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailable,
    TransientError,
)
from dreamgen.engines.bounded import (
    ACCEPT_ENCODING,
    METRICS_CAP,
    SMALL_CAP,
    BodyTooLarge,
    read_capped,
)
from dreamgen.engines.client import OpenAIClient, _describe
from dreamgen.engines.launcher import Launcher
from dreamgen.engines.limits import AdaptiveLimiter, Gate, ServerLoad, parse_metrics
from dreamgen.logs import event
from dreamgen.scenario import Dialect

# The log name predates this package; log queries match on it.
# Where an adaptive limit starts unless [adapt] start says: a full batch for most vLLM
# servers (max_num_seqs 256); it grows from there in a few scrapes where there are more.
ADAPTIVE_START = 256

log = logging.getLogger("dreamgen.vllm")


@dataclass(eq=False)
class Replica:
    """One server and what is known about it."""

    url: str
    client: OpenAIClient
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

    @property
    def up(self) -> bool:
        return self.state == "up"

    @property
    def inflight(self) -> int:
        return self.limiter.inflight


class ServerEngine(Engine):
    """OpenAI-compatible servers (vLLM or llama.cpp), health- and load-aware.

    ``servers``: base URLs of replicas serving ``model``; ``concurrency``: the in-flight
    limit per server (the ceiling when ``adaptive``; ``adapt.start`` is where it starts).
    ``start(wait=True)`` waits out a down server (a daemon); ``start(wait=False)`` fails
    fast with one clear line (a build).
    """

    gate: Gate  # always: the window follows the healthy replicas' limits

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
        adapt: AdaptConfig | None = None,
        timeout_s: float = 600.0,
        max_attempts: int = 6,
        health_interval_s: float = 2.0,
        backoff_max_s: float = 30.0,
        guided: str = "response_format",
        schema_dialect: Dialect = "bounded",
        launcher: Launcher | None = None,
        max_response_bytes: int | None = None,
    ) -> None:
        if not servers:
            raise EngineError("no server URL given")
        self.name = name
        self.model = model
        self.hard_cap = hard_cap
        self.health_interval_s = health_interval_s
        self.backoff_max_s = max(backoff_max_s, health_interval_s)
        self.guided = guided
        self.schema_dialect = schema_dialect
        self.launcher = launcher
        ceiling = min(concurrency, hard_cap) if hard_cap else concurrency
        adapt = adapt if adapt is not None else AdaptConfig()
        self.replicas = [
            Replica(
                url=url.rstrip("/").removesuffix("/v1"),
                client=OpenAIClient(
                    url,
                    model,
                    api_key=api_key,
                    concurrency=ceiling,
                    timeout_s=timeout_s,
                    max_attempts=max_attempts,
                    max_response_bytes=max_response_bytes,
                ),
                limiter=AdaptiveLimiter(
                    adapt.start or (min(ceiling, ADAPTIVE_START) if adaptive else ceiling),
                    max_limit=ceiling,
                    adaptive=adaptive,
                    settings=adapt,
                ),
            )
            for url in servers
        ]
        for r in self.replicas:
            r.client.on_retry = self._retry_hook(r)
        self.gate = Gate(self._capacity)
        self.outages = 0
        self._server_errors = 0
        self.down_since = time.monotonic()  # not ready until the first probe passes
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
    def server_errors(self) -> int:
        return self._server_errors

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

    async def start(self, *, wait: bool = False, timeout_s: float | None = None) -> None:
        """Open clients and check every server; see the class docstring for ``wait``."""
        for r in self.replicas:
            await r.client.start()
        self._probe_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10, sock_connect=5),
            headers={"Accept-Encoding": ACCEPT_ENCODING},
            auto_decompress=False,  # read_capped decodes, with a cap
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
                event(log, logging.WARNING, "not_ready", "waiting for the server: %s", logged)
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
                if exc.status is not None:  # an HTTP 429/5xx answer (not a lost connection)
                    self._server_errors += 1
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

    async def _get(self, url: str, cap: int = SMALL_CAP) -> tuple[int, bytes]:
        assert self._probe_session is not None
        async with self._probe_session.get(url) as resp:
            return resp.status, await read_capped(resp, cap)

    async def _probe(self, r: Replica) -> None:
        """One health check (and metrics scrape) of one server; updates its state."""
        try:
            status, _ = await self._get(f"{r.url}/health")
        except (aiohttp.ClientError, TimeoutError, OSError, TransientError) as exc:
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
            status, body = await self._get(f"{r.url}/metrics", METRICS_CAP)
        except (aiohttp.ClientError, TimeoutError, OSError, TransientError) as exc:
            if isinstance(exc, BodyTooLarge):
                log.warning("%s/metrics: %s; concurrency stays fixed", r.url, exc)
                r.metrics_ok = False
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
                event(log,
                    logging.WARNING, "server_up", "%s is back after %.1fs", r.url, took,
                    server=r.url, outage_s=round(took, 2),
                )  # fmt: skip
            else:
                event(log, logging.INFO, "server_up", "%s is ready", r.url, server=r.url)
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
            event(log,
                level, "server_down", "%s is not ready: %s", r.url, reason,
                server=r.url, reason=reason,
            )  # fmt: skip
        r.state, r.reason = "down", reason
        r.load = None

    def _after_probes(self) -> None:
        ready = self.ready
        if ready and not self._was_ready:
            self.down_since = None
        elif not ready and self._was_ready:
            self.outages += 1
            self.down_since = time.monotonic()
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
