"""The daemon's health and metrics over HTTP: ``/healthz``, ``/readyz``, ``/metrics``.

``/healthz`` answers 200 while the process serves at all; ``/readyz`` 200 only when the
engine is reachable and the store writable (503 with the reason otherwise); ``/metrics``
is Prometheus text from ``prometheus-client``. The server caps its connections and
closes idle ones (``httpguard``): a flood of sockets cannot exhaust the daemon. Counters
are per process (they restart at zero with the daemon, as Prometheus expects);
``dreamgen_store_records`` is the durable total in the output folder.

Most values are read from the run at scrape time (one source of truth, nothing to keep
in step); the latency histogram and the reload counter are recorded as they happen.
"""

from __future__ import annotations

import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as render
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dreamgen.httpguard import GuardedServer

if TYPE_CHECKING:
    from dreamgen.engines import Engine

LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """The daemon's registry; ``attach`` a run (and its engine appears when it starts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "dreamgen_request_latency_seconds",
            "Latency of successful engine requests (retries included).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "dreamgen_reloads", "SIGHUP reloads by result.", ["result"], registry=self.registry
        )
        for result in ("ok", "refused"):
            self.reloads.labels(result)
        self.run: Any = None
        self.ready: Callable[[], tuple[bool, str]] = lambda: (False, "starting")
        self.started = time.time()
        self._rejected_base: TallyCounter[str] = TallyCounter()
        self.registry.register(_RunCollector(self))

    def attach(self, run: Any) -> None:
        """Report on ``run``; rejections it restored from the manifest are not this process's."""
        self.run = run
        self._rejected_base = TallyCounter(run.summary.rejected)

    def observe(self, completion: Any) -> None:
        self.latency.observe(completion.latency_s)

    def render(self) -> bytes:
        return render(self.registry)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class _RunCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # values appear only once a run exists

    def collect(self) -> Iterator[Metric]:
        m = self.m
        ready, _ = m.ready()
        yield _gauge("dreamgen_ready", "1 when the engine is reachable and the store writable.",
                     1.0 if ready else 0.0)  # fmt: skip
        yield _gauge("dreamgen_start_time_seconds", "Unix time the daemon started.", m.started)
        run = m.run
        if run is None:
            return
        s = run.summary
        yield _counter("dreamgen_records_accepted", "Records accepted and durable.", s.accepted)
        rej = CounterMetricFamily(
            "dreamgen_records_rejected", "Requests whose answer was rejected, by reason.",
            labels=["reason"],
        )  # fmt: skip
        for reason, n in sorted(s.rejected.items()):
            rej.add_metric([reason], max(0, n - m._rejected_base.get(reason, 0)))
        yield rej
        yield _counter("dreamgen_requests", "Requests sent to the engine.", s.requests)
        tokens = CounterMetricFamily(
            "dreamgen_tokens", "Tokens: prompt, completion (generated), accepted (in records).",
            labels=["kind"],
        )  # fmt: skip
        tokens.add_metric(["prompt"], s.prompt_tokens)
        tokens.add_metric(["completion"], s.completion_tokens)
        tokens.add_metric(["accepted"], s.accepted_tokens)
        yield tokens
        yield _gauge("dreamgen_requests_in_flight", "Requests in flight now.", run.inflight)
        yield _gauge("dreamgen_concurrency_limit", "In-flight limit now (0 in an outage).",
                     run.limit)  # fmt: skip
        yield _counter("dreamgen_engine_errors", "Requests that failed after retries.",
                       s.engine_errors)  # fmt: skip
        store = run.store
        yield _counter("dreamgen_shard_rotations", "Shards closed by this process.",
                       store.rotations)  # fmt: skip
        yield _gauge("dreamgen_store_records", "Records durable in the output folder.",
                     store.count)  # fmt: skip
        yield _gauge("dreamgen_store_shards", "Closed shards in the output folder.",
                     len(store.closed))  # fmt: skip
        if run.config.count is not None:
            yield _gauge("dreamgen_target_records", "The target for the output folder.",
                         run.config.count)  # fmt: skip
        yield from self._coverage(run)
        engine = run.engine
        if engine is not None:
            yield from self._engine(engine)

    def _coverage(self, run: Any) -> Iterator[Metric]:
        labels = ["cue_kind", "distractor_kind", "difficulty"]
        filled = GaugeMetricFamily(
            "dreamgen_coverage_filled", "Accepted records per taxonomy cell.", labels=labels
        )
        quota = GaugeMetricFamily(
            "dreamgen_coverage_quota", "Quota per taxonomy cell (bounded runs).", labels=labels
        )
        got = want = 0.0
        for row in run.planner.coverage():
            if str(row["cue_kind"]).startswith("(stakes "):
                continue  # an overlay on the cells (its records are counted in their cells)
            lv = [str(row["cue_kind"]), str(row["distractor_kind"]), str(row["difficulty"])]
            filled.add_metric(lv, float(row["filled"]))
            if row["quota"] is not None:
                quota.add_metric(lv, float(row["quota"]))
                want += float(row["quota"])
                got += min(float(row["filled"]), float(row["quota"]))
        yield filled
        yield quota
        if want > 0:
            yield _gauge("dreamgen_coverage_fill_ratio",
                         "Share of the quotas filled (each cell counted up to its quota).",
                         got / want)  # fmt: skip

    def _engine(self, engine: Engine) -> Iterator[Metric]:
        yield _counter("dreamgen_engine_retries", "Engine request retries.", engine.retries)
        yield _counter("dreamgen_engine_outages", "Times no server was ready.",
                       engine.outages)  # fmt: skip
        if engine.launcher is not None:
            yield _counter("dreamgen_server_restarts", "Restarts of the launched server.",
                           engine.launcher.restarts)  # fmt: skip
        servers = engine.status()
        if servers is None:
            return
        names = {
            "up": ("dreamgen_server_up", "1 while the server is healthy and serves the model."),
            "limit": ("dreamgen_server_concurrency_limit", "Adaptive in-flight limit."),
            "inflight": ("dreamgen_server_requests_in_flight", "Our requests in flight."),
            "running": ("dreamgen_server_requests_running", "vLLM: requests running."),
            "waiting": ("dreamgen_server_requests_waiting", "vLLM: requests waiting."),
            "kv_usage": ("dreamgen_server_kv_cache_usage", "vLLM: KV-cache usage (0-1)."),
        }
        families = {k: GaugeMetricFamily(n, d, labels=["server"]) for k, (n, d) in names.items()}
        for st in servers:
            families["up"].add_metric([st["url"]], 1.0 if st["state"] == "up" else 0.0)
            for key in ("limit", "inflight", "running", "waiting", "kv_usage"):
                if st.get(key) is not None:
                    families[key].add_metric([st["url"]], float(st[key]))
        yield from families.values()


class MetricsServer:
    """aiohttp server for /healthz, /readyz and /metrics, in the daemon's event loop."""

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_connections: int = 64,
        idle_s: float = 10.0,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.idle_s = idle_s
        self.server: GuardedServer | None = None
        self._runner: web.ServerRunner | None = None

    async def start(self) -> None:
        self.server = GuardedServer(
            self._dispatch, max_connections=self.max_connections, idle_s=self.idle_s
        )
        self._runner = web.ServerRunner(self.server, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        route = {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics}
        handler = route.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not found\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n")
        return await handler(request)

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        ready, reason = self.metrics.ready()
        if ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
