"""dreamgen's benchmarks against the simulated vLLM server; prints a table, writes JSON.

    python bench/run.py            # full: every setting, 10k/100k records (~15 minutes)
    python bench/run.py --quick    # about a minute; last line: useful/capacity: R
    python bench/run.py --ci       # seconds, tiny sizes (tests/test_bench.py): proves it runs

Figures (bench/README.md explains each one and how to read it):

(a)  end-to-end: dreamgen's pipeline (``Run``, the code behind ``dreamgen build``) in its
     own process against ``tests/fake_vllm.py`` in another, per profile (8b, 1b), at fixed
     concurrency limits and with adaptive concurrency; over a steady-state window it
     reports useful (accepted) tokens/s ÷ the sim's capacity, generated tokens/s ÷
     capacity, the engine's average batch fill (the sim's slot-step counters), the yield,
     and dreamgen's CPU per request (process CPU time ÷ requests finished).
(a') the same requests (dreamgen's exact bodies, captured from a dry run) replayed by a
     minimal aiohttp client, the ideal reference: dreamgen ÷ ideal.
(b)  post-processing cost per record on one core: parse, validate, label, filter, dedup,
     write, each and in total (the pipeline's own ``_process`` with a stub engine).
(c)  peak memory (ru_maxrss) after 10k and 100k records through the same path.
(d)  (a) again with 10% injected faults: completion rate, retries, lost records (records
     reported accepted but absent from the store) and duplicates on disk.

Workers run as subprocesses of this script (``--worker KIND``, parameters on stdin, one
``RESULT {json}`` line on stdout) so each measurement owns its process: its CPU time and
peak memory are its own, and the sim never shares its event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `dreamgen` importable
    sys.path.insert(0, str(ROOT))

from dreamgen.engines.base import Engine  # noqa: E402
from tests.fake_vllm import (  # noqa: E402
    BYTES_PER_TOKEN,
    DEFAULT_CORPUS,
    PROFILES,
    Corpus,
    SimProcess,
    VLLMSim,
)

RESULTS = ROOT / "bench" / "results"

# 10% of requests draw a fault, spread over every kind the sim injects.
FAULT_MIX: dict[str, float] = {
    "error_500": 0.015,
    "error_502": 0.01,
    "error_503": 0.015,
    "rate_limit": 0.015,  # 429 + Retry-After
    "stall": 0.01,
    "hang": 0.005,  # never answers: the client's timeout must fire
    "reset": 0.01,  # connection reset after generating
    "truncated": 0.01,  # finish_reason "length"
    "malformed": 0.005,  # not JSON
    "wrong_schema": 0.005,  # JSON without required fields
}


# ---------------------------------------------------------------------------------------
# Settings per mode
# ---------------------------------------------------------------------------------------


@dataclass
class ProfileRun:
    """How one sim profile is driven: its speedup, slot override and concurrency limits."""

    speedup: float
    concurrency: list[int]
    slots: int | None = None
    adaptive_cap: int | None = None  # ceiling for the adaptive run (default 2 x slots)


@dataclass
class Mode:
    name: str
    profiles: dict[str, ProfileRun]
    window_s: float  # steady-state measurement window per end-to-end run
    post_n: int  # model outputs through post-processing (b)
    mem_n: tuple[int, int]  # records for the memory growth check (c)
    fault_profiles: list[str]
    bodies_n: int  # request bodies captured for the ideal client
    warmup_min_s: float = 1.0
    warmup_latencies: float = 1.5  # warm-up in expected request latencies
    ideal: bool = True
    adaptive_profiles: list[str] | None = None  # None: every profile but stress


MODES: dict[str, Mode] = {
    "ci": Mode(
        "ci",
        {"8b": ProfileRun(speedup=20, concurrency=[48], slots=32)},
        window_s=1.0,
        post_n=100,
        mem_n=(100, 300),
        fault_profiles=["8b"],
        bodies_n=100,
        warmup_min_s=0.5,
        warmup_latencies=1.0,
    ),
    # Shorter latencies (higher speedups) than full, so the client must sustain a higher
    # request rate: a harder, shorter test.
    "quick": Mode(
        "quick",
        {
            "8b": ProfileRun(speedup=5, concurrency=[512]),
            "1b": ProfileRun(speedup=2.5, concurrency=[1280]),
        },
        window_s=2.0,
        post_n=600,
        mem_n=(500, 5000),
        fault_profiles=["8b"],
        bodies_n=600,
        warmup_latencies=1.0,
    ),
    "full": Mode(
        "full",
        {
            "8b": ProfileRun(speedup=2, concurrency=[256, 400, 512, 768]),
            "1b": ProfileRun(speedup=1.5, concurrency=[512, 1024, 1280, 2048]),
            "stress": ProfileRun(speedup=1, concurrency=[256]),
        },
        window_s=10.0,
        post_n=10_000,
        mem_n=(10_000, 100_000),
        fault_profiles=["8b", "1b"],
        bodies_n=3000,
    ),
}


def mean_completion_tokens(corpus: Path = DEFAULT_CORPUS, n: int = 500) -> float:
    """Average completion tokens of the sim's answers (it bills ceil(bytes / 4))."""
    c = Corpus(corpus, seed=1)
    return statistics.mean(
        max(1, math.ceil(len(c.draw().encode()) / BYTES_PER_TOKEN)) for _ in range(n)
    )


def latency_s(profile: str, pr: ProfileRun, concurrency: int, tokens: float) -> float:
    """Expected time a request spends in the sim at a full batch (queueing included)."""
    p = PROFILES[profile]
    slots = pr.slots or p.slots
    step = (p.t0_s + p.c_s * min(slots, concurrency)) / pr.speedup
    return tokens * step * max(1.0, concurrency / slots)


# ---------------------------------------------------------------------------------------
# Captured request bodies (shared with bench/gpu/)
# ---------------------------------------------------------------------------------------


class _RecordingSim(VLLMSim):
    """The sim, keeping every chat request body it receives (bytes, as sent)."""

    def __init__(self, *args: Any, limit: int, on_full: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.bodies: list[bytes] = []
        self.limit = limit
        self.on_full = on_full

    async def _chat(self, request: Any) -> Any:
        if len(self.bodies) < self.limit:
            self.bodies.append(await request.read())
            if len(self.bodies) == self.limit and self.on_full is not None:
                self.on_full()
        return await super()._chat(request)


async def dump_bodies(
    n: int, config: dict[str, Any] | None = None, *, model: str = "dreamgen-sim"
) -> list[bytes]:
    """dreamgen's exact request bodies for its first ``n`` requests, from a dry run.

    A dry run is the real pipeline (planner, prompts, engine client) against an in-process
    zero-latency sim that records each body as sent (model name, messages, sampling,
    response_format); the answers are corpus scenarios, so the planner behaves as in a run.
    ``config``: Config fields (TOML-shaped dict) — engine, servers and out are set here.
    """
    from dreamgen.config import Config
    from dreamgen.pipeline import Run

    out = Path(tempfile.mkdtemp(prefix="dreamgen-dump-"))
    run: Any = None
    sim = _RecordingSim("stress", model=model, limit=n, on_full=lambda: run.stop("dumped"))
    await sim.start()
    try:
        fields = {**(config or {}), "engine": "openai", "servers": [sim.url]}
        fields.update(model=model, out=str(out), count=None)
        fields.setdefault("concurrency", 64)
        run = Run(Config.model_validate(fields))
        await run.run(grace_s=10)
    finally:
        await sim.stop()
        shutil.rmtree(out, ignore_errors=True)
    return sim.bodies[:n]


# ---------------------------------------------------------------------------------------
# Workers (each in its own process)
# ---------------------------------------------------------------------------------------


async def _scrape_sim(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The sim's /metrics as {name: value} (fill counters, vLLM gauges, tokens)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name
            if "finished_reason" in s.labels:
                key += "/" + s.labels["finished_reason"]
            elif "kind" in s.labels:
                key += "/" + s.labels["kind"]
            out[key] = s.value
    return out


def _store_ids(out: Path) -> tuple[int, set[str]]:
    """Lines and distinct ids in an output folder's shards (closed and open)."""
    lines, ids = 0, set()
    for path in sorted((out / "shards").glob("part-*.jsonl*")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                lines += 1
                ids.add(orjson.loads(line)["id"])
    return lines, ids


def runq_wait_s() -> float:
    """Seconds this process's threads spent runnable but waiting for a CPU (schedstat).

    On a shared machine this shows how much of a window the client was starved by other
    processes; 0 where /proc/*/schedstat is missing.
    """
    total = 0
    for path in Path("/proc/self/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(path.read_text().split()[1])
    return total / 1e9


async def worker_dreamgen(p: dict[str, Any]) -> dict[str, Any]:
    """dreamgen's pipeline against the sim: warm up, measure a window, stop, check the store."""
    from dreamgen.config import Config
    from dreamgen.pipeline import Run

    out = Path(p["out"])
    fields = {**p["config"], "out": str(out), "count": None}
    cfg = Config.model_validate(fields)
    reported: list[str] = []
    run = Run(cfg, on_record=lambda r: reported.append(r.id))
    s = run.summary
    timeline: list[list[float]] = []

    def snap() -> dict[str, float]:
        done = s.accepted + sum(s.rejected.values())
        return {
            "t": time.monotonic(),
            "cpu": time.process_time(),
            "runq": runq_wait_s(),
            "requests": s.requests,
            "done": done,
            "accepted": s.accepted,
            "accepted_tokens": s.accepted_tokens,
            "completion_tokens": s.completion_tokens,
            "inflight": run.inflight,
            "limit": run.limit,
        }

    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(run.run(grace_s=p["grace_s"]))
        t0 = time.monotonic()

        async def sample() -> None:
            while True:
                await asyncio.sleep(0.25)
                timeline.append([round(time.monotonic() - t0, 2), run.inflight, run.limit])

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.wait({task}, timeout=p["warmup_s"])
            if task.done():
                task.result()  # raises what stopped it
            a, sim_a = snap(), await _scrape_sim(http, p["sim_url"])
            await asyncio.wait({task}, timeout=p["window_s"])
            b, sim_b = snap(), await _scrape_sim(http, p["sim_url"])
            run.stop("bench")
            summary = await task
        finally:
            sampler.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, sampler, return_exceptions=True)
        sim_end = await _scrape_sim(http, p["sim_url"])
    lines, ids = _store_ids(out)
    engine = run.engine
    return {
        "window": {"a": a, "b": b, "sim_a": sim_a, "sim_b": sim_b},
        "sim_end": sim_end,
        "summary": summary.as_dict(),
        "engine_errors": s.rejected.get("engine_error", 0),
        "cancelled": s.requests - (s.accepted + sum(s.rejected.values())),
        "retries": engine.retries if engine is not None else None,
        "reported": len(reported),
        "reported_unique": len(set(reported)),
        "store_lines": lines,
        "store_ids": len(ids),
        "lost": len(set(reported) - ids),
        "timeline": timeline,
    }


async def worker_ideal(p: dict[str, Any]) -> dict[str, Any]:
    """A minimal client: replay captured bodies, C at a time, read and decode each answer."""
    bodies = [ln for ln in Path(p["bodies"]).read_bytes().splitlines() if ln.strip()]
    url = p["sim_url"] + "/v1/chat/completions"
    c = p["concurrency"]
    counts = {"requests": 0, "done": 0, "completion_tokens": 0, "errors": 0}
    nxt = iter(range(10**12))
    connector = aiohttp.TCPConnector(limit=c + 64, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one_at_a_time() -> None:
            while True:
                body = bodies[next(nxt) % len(bodies)]
                counts["requests"] += 1
                async with http.post(url, data=body, headers=headers) as r:
                    raw = await r.read()
                    status = r.status
                if status == 200:
                    data = orjson.loads(raw)
                    counts["completion_tokens"] += data["usage"]["completion_tokens"]
                else:
                    counts["errors"] += 1
                counts["done"] += 1

        def snap() -> dict[str, float]:
            return {
                "t": time.monotonic(),
                "cpu": time.process_time(),
                "runq": runq_wait_s(),
                **counts,
            }

        workers = [asyncio.create_task(one_at_a_time()) for _ in range(c)]
        try:
            await asyncio.sleep(p["warmup_s"])
            a, sim_a = snap(), await _scrape_sim(http, p["sim_url"])
            await asyncio.sleep(p["window_s"])
            b, sim_b = snap(), await _scrape_sim(http, p["sim_url"])
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return {"window": {"a": a, "b": b, "sim_a": sim_a, "sim_b": sim_b}}


class _StubEngine(Engine):
    """Answers each chat with the next prepared output: post-processing without a network."""

    name = "openai"
    model = "bench-stub"

    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs

    async def chat(self, messages: Any, **kw: Any) -> Any:
        from dreamgen.engines import Completion

        content = next(self.outputs)
        tokens = max(1, math.ceil(len(content) / BYTES_PER_TOKEN))
        return Completion(
            content=content,
            finish_reason="stop",
            prompt_tokens=1000,
            completion_tokens=tokens,
            latency_s=0.0,
        )


def _pin_one_core() -> int | None:
    """Run on one CPU (the last one this process may use); returns it."""
    with contextlib.suppress(AttributeError, OSError):
        cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return cpu
    return None


def _stub_run(out: Path) -> Any:
    from dreamgen.config import Config
    from dreamgen.pipeline import Run

    cfg = Config(
        engine="openai", servers=["http://127.0.0.1:9"], model="bench-stub", out=out, count=None
    )
    return Run(cfg)


async def worker_post(p: dict[str, Any]) -> dict[str, Any]:
    """Per-stage and total post-processing CPU cost per record, on one core.

    Per stage: the pipeline's own stage chain (``dreamgen.stages``), timed by the chain
    itself while ``Run._process`` feeds it prepared answers, so the bench times exactly
    what runs in production. An item a stage rejects is counted at that stage only.
    """
    from dreamgen.cards import CardSet
    from dreamgen.config import Config
    from dreamgen.planner import Planner

    cpu = _pin_one_core()
    n = p["n"]
    corpus = Corpus(Path(p["corpus"]), seed=p.get("seed", 0))
    raws = [corpus.draw() for _ in range(n)]
    cfg = Config()
    planner = Planner(CardSet.load(cfg.prompts), cfg.plan, None)
    t = time.process_time()
    requests = [planner.next() for _ in range(n)]
    plan_cpu = time.process_time() - t
    tmp = Path(p["tmp"])

    run = _stub_run(tmp / "stages")
    run.chain.timed = True
    engine = _StubEngine(iter(raws))
    gc.collect()
    for req in requests:
        await run._process(engine, req)
    run._flush()
    stages = {
        name: {
            "n": st.n,
            "rejected": st.rejected,
            "cpu_us": st.cpu_ns / 1e3 / max(1, st.n),
            "cpu_us_per_output": st.cpu_ns / 1e3 / n,
        }
        for name, st in run.chain.times.items()
    }
    run.store.close()
    run.dedup.close()

    # Total: the pipeline's own per-request step (Run._process) with a stub engine, so
    # nothing is left out (planner bookkeeping, the pending map, flushes every 32).
    best: dict[str, float] = {}
    for rep in range(p.get("repeats", 1)):
        run = _stub_run(tmp / f"total-{rep}")
        engine = _StubEngine(iter(raws))
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        for req in requests:
            await run._process(engine, req)
        run._flush()
        c1, w1 = time.process_time(), time.perf_counter()
        s = run.summary
        total = {
            "n": n,
            "accepted": s.accepted,
            "cpu_us": 1e6 * (c1 - c0) / n,
            "wall_us": 1e6 * (w1 - w0) / n,
            "cpu_us_per_accepted": 1e6 * (c1 - c0) / max(1, s.accepted),
            "rejected": dict(s.rejected),
        }
        run.store.close()
        run.dedup.close()
        if not best or total["cpu_us"] < best["cpu_us"]:
            best = total
    return {
        "cpu": cpu,
        "stages": stages,
        "total": best,
        "plan_cpu_us": 1e6 * plan_cpu / n,
    }


def _varied_outputs(corpus_path: Path, seed: int) -> Any:
    """Endless distinct scenario JSON: corpus scenarios with about half their words swapped.

    Every text field keeps its length and shape but draws words at random from the
    corpus vocabulary, so no two records are near-duplicates (the dedup index keeps
    them all, as in a long run) and sizes match the corpus.
    """
    items = [orjson.loads(ln) for ln in corpus_path.read_bytes().splitlines() if ln.strip()]
    vocab = sorted({w for d in items for w in re.findall(r"[A-Za-z']+", orjson.dumps(d).decode())})
    rng = random.Random(seed)

    def vary(text: str) -> str:
        words = text.split(" ")
        return " ".join(rng.choice(vocab) if rng.random() < 0.5 else w for w in words)

    while True:
        d = orjson.loads(orjson.dumps(rng.choice(items)))
        d["opening"] = vary(d["opening"])[:400]
        for ex in d["exchanges"]:
            ex["assistant"], ex["user"] = vary(ex["assistant"])[:400], vary(ex["user"])[:400]
        for turn in ("idea_turn", "decision_turn"):
            for key in ("before", "after"):
                d[turn][key] = vary(d[turn][key])[:200]
        d["listening"], d["reflex"] = vary(d["listening"])[:600], vary(d["reflex"])[:600]
        d["extra_cues"], d["extra_distractors"] = [], []
        yield orjson.dumps(d).decode()


async def worker_mem(p: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS after N records through the pipeline's per-request path and its store."""
    from dreamgen.cards import CardSet
    from dreamgen.config import Config
    from dreamgen.planner import Planner

    n = p["n"]
    outputs = _varied_outputs(Path(p["corpus"]), p.get("seed", 0))
    cfg = Config()
    planner = Planner(CardSet.load(cfg.prompts), cfg.plan, None)
    pool = [planner.next() for _ in range(256)]  # requests are small and bounded; reuse them
    run = _stub_run(Path(p["tmp"]))
    engine = _StubEngine(outputs)
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    samples: list[tuple[int, int]] = []  # (records accepted, current RSS bytes)
    every = max(1, n // 20)
    t0 = time.perf_counter()
    for i in range(n):
        req = pool[i % len(pool)]
        if req.cell is not None:
            run.planner.inflight[req.cell] += 1  # as planner.next() would have counted it
        await run._process(engine, req)
        if i % every == every - 1:
            samples.append((run.summary.accepted, _rss_bytes()))
    run._flush()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = run.summary
    run.store.close()
    run.dedup.close()
    return {
        "n": n,
        "accepted": s.accepted,
        "rejected": dict(s.rejected),
        "baseline_kb": base,
        "peak_kb": peak,
        "elapsed_s": elapsed,
        "rss_samples": samples,
        "bytes_per_record_slope": _slope(samples[len(samples) // 2 :]),
    }


def _rss_bytes() -> int:
    """Resident set size now (not the peak)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares bytes per record over (records, rss) samples."""
    if len(points) < 2:
        return None
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return (
        round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den) if den else None
    )


WORKERS = {
    "dreamgen": worker_dreamgen,
    "ideal": worker_ideal,
    "post": worker_post,
    "mem": worker_mem,
}


def worker_main(kind: str) -> None:
    # Import the pipeline before waiting for parameters: the parent starts the sim
    # meanwhile, and import time stays out of every measurement.
    import dreamgen.pipeline  # noqa: F401

    params = orjson.loads(sys.stdin.buffer.read())
    result = asyncio.run(WORKERS[kind](params))
    sys.stdout.write("RESULT " + orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    pass


async def start_worker(kind: str) -> asyncio.subprocess.Process:
    """Start a worker subprocess; it imports dreamgen, then waits for its parameters."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def run_worker(
    kind: str,
    params: dict[str, Any],
    *,
    proc: asyncio.subprocess.Process | None = None,
    scrape_url: str | None = None,
    timeout_s: float = 1800,
) -> tuple[dict[str, Any], list[list[float]]]:
    """Run a worker to its result; meanwhile scrape the sim's /metrics once a second."""
    if proc is None:
        proc = await start_worker(kind)
    scrapes: list[list[float]] = []

    async def scrape() -> None:
        if scrape_url is None:
            return
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while True:
                await asyncio.sleep(1.0)
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    m = await _scrape_sim(http, scrape_url)
                    scrapes.append(
                        [
                            round(time.monotonic() - t0, 2),
                            m.get("vllm:num_requests_running", 0),
                            m.get("vllm:num_requests_waiting", 0),
                            m.get("vllm:generation_tokens_total", 0),
                        ]
                    )

    scraper = asyncio.create_task(scrape())
    try:
        stdout, stderr = await asyncio.wait_for(
            proc.communicate(orjson.dumps(params)), timeout=timeout_s
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise WorkerFailed(f"{kind} worker timed out after {timeout_s:g}s") from None
    finally:
        scraper.cancel()
        await asyncio.gather(scraper, return_exceptions=True)
    lines = [ln for ln in stdout.decode().splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(stderr.decode(errors="replace").splitlines()[-15:])
        raise WorkerFailed(f"{kind} worker exited {proc.returncode}:\n{tail}")
    return orjson.loads(lines[-1][len("RESULT ") :]), scrapes


@dataclass
class Bench:
    mode: Mode
    out_dir: Path
    tokens: float = 0.0
    bodies_path: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dreamgen-bench-")))

    def sim_args(self, profile: str, pr: ProfileRun, faults: bool, seed: int) -> list[str]:
        args = ["--profile", profile, "--speedup", f"{pr.speedup:g}", "--seed", str(seed)]
        if pr.slots:
            args += ["--slots", str(pr.slots)]
        if faults:
            for kind, rate in FAULT_MIX.items():
                args += ["--fault", f"{kind}={rate}"]
            # Time-based faults run at the sim's speed, like everything else in it.
            args += ["--retry-after", f"{1.0 / pr.speedup:g}", "--stall-s", f"{2.0 / pr.speedup:g}"]
        return args

    def client_config(
        self, profile: str, pr: ProfileRun, concurrency: int, *, adaptive: bool, faults: bool
    ) -> dict[str, Any]:
        lat = latency_s(profile, pr, concurrency, self.tokens)
        cfg: dict[str, Any] = {
            "engine": "openai",
            "concurrency": concurrency,
            "adaptive": adaptive,
            # Generous: many expected latencies, so only a hung request ever times out.
            "request_timeout_s": round(max(10 * lat, 10.0), 2),
        }
        if adaptive:
            # The controller's clock runs at the sim's speed too: a 2 s scrape interval and
            # a 5 s cooldown against a GPU S times faster would be S times too sluggish.
            cfg["serving"] = {"health_interval_s": round(2.0 / pr.speedup, 3)}
            cfg["adapt"] = {"cooldown_s": round(5.0 / pr.speedup, 3)}
        if faults:
            # The 'hang' fault never answers: a timeout at 3 expected latencies (600 s
            # against a real server) frees its slot without cutting off the longest
            # answers (about 2.3 x the mean) or stalled ones.
            cfg["request_timeout_s"] = round(max(3 * lat, 2.0), 2)
        return cfg

    async def end_to_end(
        self,
        kind: str,
        profile: str,
        pr: ProfileRun,
        concurrency: int,
        *,
        adaptive: bool = False,
        faults: bool = False,
        seed: int = 0,
    ) -> dict[str, Any]:
        """One run against a fresh sim process; returns raw counters and derived ratios."""
        lat = latency_s(profile, pr, concurrency, self.tokens)
        # With the limit at or above the slot count the batch is full from the first step;
        # completions (and so accepted records) settle after about one latency.
        warmup = max(self.mode.warmup_min_s, self.mode.warmup_latencies * lat + 0.5)
        if adaptive:  # the limit has to find its level (about the slot count) first
            slots = pr.slots or PROFILES[profile].slots
            warmup = max(warmup, 3 * latency_s(profile, pr, slots, self.tokens) + 1.0)
        window = self.mode.window_s
        cfg = self.client_config(profile, pr, concurrency, adaptive=adaptive, faults=faults)
        # Fault runs drain (in-flight requests finish or time out) so the store can be
        # checked against what was reported; other runs cancel what is left at once.
        grace = 2 * cfg["request_timeout_s"] + 2 * lat if faults else 0.5
        out = self.tmp / f"{kind}-{profile}-{concurrency}-{int(adaptive)}-{int(faults)}"
        proc = await start_worker(kind)  # imports while the sim starts
        try:
            sp = await asyncio.to_thread(
                SimProcess(*self.sim_args(profile, pr, faults, seed)).__enter__
            )
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        try:
            cfg.update(servers=[sp.url], model=sp.model)
            params = {
                "config": cfg,
                "out": str(out),
                "sim_url": sp.url,
                "warmup_s": warmup,
                "window_s": window,
                "grace_s": grace,
                "bodies": str(self.bodies_path),
                "concurrency": concurrency,
            }
            raw, scrapes = await run_worker(kind, params, proc=proc, scrape_url=sp.url)
            stats = await asyncio.to_thread(sp.stats)
            capacity = stats["capacity_tok_s"]
        finally:
            await asyncio.to_thread(sp.__exit__, None, None, None)
        shutil.rmtree(out, ignore_errors=True)
        row = derive(raw, capacity, pr.speedup, self.tokens)
        row.update(
            profile=profile,
            client=kind,
            concurrency=concurrency,
            adaptive=adaptive,
            faults=faults,
            speedup=pr.speedup,
            slots=stats["slots"],
            capacity_tok_s=round(capacity, 1) if capacity else None,
            warmup_s=round(warmup, 2),
            expected_latency_s=round(lat, 3),
            request_timeout_s=cfg["request_timeout_s"],
            sim_faults={k: v for k, v in stats["faults"].items() if v},
            sim_requests=stats["requests_received"],
            sim_finished=stats["requests_finished"],
            sim_aborted=stats["requests_aborted"],
            scrapes=scrapes,
        )
        for key in ("summary", "engine_errors", "cancelled", "retries", "reported", "store_lines"):
            if key in raw:
                row[key] = raw[key]
        for key in ("reported_unique", "store_ids", "lost", "timeline"):
            if key in raw:
                row[key] = raw[key]
        return row


def derive(
    raw: dict[str, Any], capacity: float | None, speedup: float, tokens: float
) -> dict[str, Any]:
    """Window ratios: generated and useful tokens/s over capacity, fill, CPU per request.

    ``capacity`` is None for the zero-latency stress profile (no ratio, only rates).
    """
    w = raw["window"]
    a, b, sa, sb = w["a"], w["b"], w["sim_a"], w["sim_b"]
    dt = b["t"] - a["t"]
    done = b["done"] - a["done"]
    gen = sb["vllm:generation_tokens_total"] - sa["vllm:generation_tokens_total"]
    slot_steps = sb["sim:slot_steps_total"] - sa["sim:slot_steps_total"]
    busy = sb["sim:busy_slot_steps_total"] - sa["sim:busy_slot_steps_total"]
    steps = sb["sim:engine_steps_total"] - sa["sim:engine_steps_total"]
    cpu = b["cpu"] - a["cpu"]
    cap = capacity or None
    # The client's core share against the real GPU: CPU per request x the request rate a
    # full batch sustains at speedup 1 (capacity / speedup / tokens per answer).
    real_rate = cap / speedup / tokens if cap else None
    row: dict[str, Any] = {
        "window_s": round(dt, 3),
        "requests_done": done,
        "req_per_s": round(done / dt, 1),
        "gen_tok_s": round(gen / dt, 1),
        "gen_over_capacity": round(gen / dt / cap, 4) if cap else None,
        "fill": round(busy / slot_steps, 4) if slot_steps else None,
        "engine_steps": steps,
        "cpu_ms_per_request": round(1e3 * cpu / done, 3) if done else None,
        "client_core_share": round(cpu / dt, 3),
        "client_runq_share": round((b["runq"] - a["runq"]) / dt, 3),
        "real_req_per_s_at_capacity": round(real_rate, 1) if real_rate else None,
        "real_core_share_at_capacity": round(cpu / done * real_rate, 4)
        if done and real_rate
        else None,
        "waiting_end": sb.get("vllm:num_requests_waiting", 0),
        "running_end": sb.get("vllm:num_requests_running", 0),
    }
    if "accepted_tokens" in b:
        acc = b["accepted"] - a["accepted"]
        acc_tok = b["accepted_tokens"] - a["accepted_tokens"]
        row.update(
            accepted_per_s=round(acc / dt, 1),
            useful_tok_s=round(acc_tok / dt, 1),
            useful_over_capacity=round(acc_tok / dt / cap, 4) if cap else None,
            yield_=round(acc / done, 4) if done else None,
            client_gen_tok_s=round((b["completion_tokens"] - a["completion_tokens"]) / dt, 1),
        )
    return row


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def adaptive_status() -> str | None:
    """None if adaptive concurrency is wired into the pipeline, else why not."""
    from dreamgen.config import Config

    if "adaptive" not in Config.model_fields:
        return "Config has no 'adaptive' field"
    try:
        import dreamgen.engines as v
    except ImportError:
        return "no adaptive controller in dreamgen (dreamgen.engines missing)"
    import inspect

    import dreamgen.engines.factory as pl

    if not hasattr(v, "AdaptiveLimiter") or "config.adaptive" not in inspect.getsource(pl):
        return "Config.adaptive is not wired into the pipeline yet"
    return None


async def section_a(b: Bench, log: Any) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    why_not = adaptive_status()
    for profile, pr in b.mode.profiles.items():
        for c in pr.concurrency:
            log(f"(a) {profile} concurrency {c}: dreamgen ...")
            rows.append(await b.end_to_end("dreamgen", profile, pr, c))
            if b.mode.ideal:
                log(f"(a') {profile} concurrency {c}: ideal client ...")
                rows.append(await b.end_to_end("ideal", profile, pr, c))
        wanted = b.mode.adaptive_profiles
        if profile == "stress" or (wanted is not None and profile not in wanted):
            continue
        if why_not is None:
            cap = pr.adaptive_cap or 2 * (pr.slots or PROFILES[profile].slots)
            log(f"(a) {profile} adaptive (ceiling {cap}) ...")
            try:
                rows.append(await b.end_to_end("dreamgen", profile, pr, cap, adaptive=True))
            except WorkerFailed as exc:
                why_not = f"adaptive run failed: {str(exc).splitlines()[-1]}"
    for r in rows:  # dreamgen ÷ ideal at the same setting
        if r["client"] != "dreamgen" or r["adaptive"]:
            continue
        for x in rows:
            same = x["profile"] == r["profile"] and x["concurrency"] == r["concurrency"]
            if x["client"] == "ideal" and same:
                # Tokens the engine generated for each client; for the zero-latency stress
                # profile (no capacity) the request rates, i.e. the clients' own ceilings.
                key = "gen_over_capacity" if r["gen_over_capacity"] is not None else "req_per_s"
                if x[key]:
                    r["over_ideal"] = round(r[key] / x[key], 4)
    return {"rows": rows, "adaptive": why_not or "ok"}


def best_settings(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per profile (stress excluded): the fixed limit with the highest useful/capacity."""
    best: dict[str, tuple[float, int]] = {}
    for r in rows:
        u = r.get("useful_over_capacity")
        if r["client"] != "dreamgen" or r["adaptive"] or u is None:
            continue
        if r["profile"] not in best or u > best[r["profile"]][0]:
            best[r["profile"]] = (u, r["concurrency"])
    return best


async def section_b(b: Bench, log: Any) -> dict[str, Any]:
    log(f"(b) post-processing, {b.mode.post_n} outputs on one core ...")
    params = {
        "n": b.mode.post_n,
        "corpus": str(DEFAULT_CORPUS),
        "tmp": str(b.tmp / "post"),
        "repeats": 2 if b.mode.name == "full" else 1,
    }
    res, _ = await run_worker("post", params)
    return res


async def section_c(b: Bench, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"n": list(b.mode.mem_n)}
    for n in b.mode.mem_n:
        log(f"(c) memory after {n} model outputs ...")
        params = {"n": n, "corpus": str(DEFAULT_CORPUS), "tmp": str(b.tmp / f"mem-{n}")}
        res, _ = await run_worker("mem", params)
        shutil.rmtree(b.tmp / f"mem-{n}", ignore_errors=True)
        out[str(n)] = res
    n1, n2 = b.mode.mem_n
    r1, r2 = out[str(n1)], out[str(n2)]
    out["growth_ratio"] = round(r2["peak_kb"] / r1["peak_kb"], 3)
    # Growth per accepted record: the RSS slope over the second half of the larger run
    # (the peak can hide growth below an import-time high-water mark).
    per = r2["bytes_per_record_slope"]
    if per is None:
        per = (r2["peak_kb"] - r1["peak_kb"]) * 1024 / max(1, r2["accepted"] - r1["accepted"])
    out["bytes_per_record"] = round(per)
    projected = r2["peak_kb"] * 1024 + per * max(0, 1_000_000 - r2["accepted"])
    out["projected_1m_records_mib"] = round(projected / 2**20)
    return out


async def section_d(
    b: Bench, log: Any, best: dict[str, int], a_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    rows = []
    for profile in b.mode.fault_profiles:
        pr = b.mode.profiles[profile]
        c = best.get(profile, pr.concurrency[0])
        log(f"(d) {profile} concurrency {c} with 10% faults ...")
        row = await b.end_to_end("dreamgen", profile, pr, c, faults=True, seed=1)
        issued = row["summary"]["requests"]
        answered = issued - row.get("engine_errors", 0) - row.get("cancelled", 0)
        row["completion_rate"] = round(answered / issued, 5) if issued else None
        row["duplicates_on_disk"] = row["store_lines"] - row["store_ids"]
        for x in a_rows:
            if (x["client"], x["profile"], x["concurrency"], x["adaptive"]) == (
                "dreamgen",
                profile,
                c,
                False,
            ):
                row["useful_no_faults"] = x.get("useful_over_capacity")
                row["gen_no_faults"] = x.get("gen_over_capacity")
        rows.append(row)
    return {"fault_mix": FAULT_MIX, "rows": rows}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_f(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def report(res: dict[str, Any]) -> tuple[str, float | None]:
    """The printed tables; returns them and the worst profile's best useful/capacity."""
    parts: list[str] = []
    best: dict[str, tuple[float, int]] = {}
    if "a" in res:
        rows = [
            [
                r["profile"],
                r["client"],
                "adaptive" if r["adaptive"] else r["concurrency"],
                r.get("useful_over_capacity"),
                r["gen_over_capacity"],
                r["fill"],
                r.get("yield_"),
                r.get("over_ideal"),
                r["req_per_s"],
                r["cpu_ms_per_request"],
                r["client_core_share"],
                r["client_runq_share"],
                r["real_core_share_at_capacity"],
            ]
            for r in res["a"]["rows"]
        ]
        best = best_settings(res["a"]["rows"])
        parts.append(
            "(a) end to end vs the sim's capacity, steady-state window\n"
            + table(
                [
                    "profile",
                    "client",
                    "limit",
                    "useful/cap",
                    "gen/cap",
                    "fill",
                    "yield",
                    "÷ideal",
                    "req/s",
                    "cpu ms/req",
                    "core",
                    "cpu-wait",
                    "core@1x",
                ],
                rows,
            )
            + f"\nadaptive concurrency: {res['a']['adaptive']}"
        )
    if "b" in res:
        b = res["b"]
        rows = [
            [k, v["n"], v["rejected"], v["cpu_us"], v["cpu_us_per_output"], ""]
            for k, v in b["stages"].items()
        ]
        t = b["total"]
        per_output = sum(v["cpu_us_per_output"] for v in b["stages"].values())
        rows.append(["sum of stages", "", "", "", per_output, ""])
        rows.append(["total (Run._process)", t["n"], "", "", t["cpu_us"], t["wall_us"]])
        rows.append(["total per accepted", t["accepted"], "", "", t["cpu_us_per_accepted"], ""])
        rows.append(["(planner.next: a request)", t["n"], "", "", b["plan_cpu_us"], ""])
        parts.append(
            f"(b) post-processing per model output, one core (cpu {b['cpu']}); "
            "stages timed by the pipeline's own chain\n"
            + table(["stage", "n in", "rejected", "cpu µs/in", "cpu µs/output", "wall µs"], rows)
        )
    if "c" in res:
        c = res["c"]
        rows = [
            [n, v["accepted"], v["peak_kb"] / 1024, v["bytes_per_record_slope"]]
            for n, v in c.items()
            if isinstance(v, dict)
        ]
        parts.append(
            "(c) peak memory (ru_maxrss) after N model outputs through Run._process + store\n"
            + table(["outputs", "accepted", "peak MiB", "B/record"], rows)
            + f"\ngrowth ratio {c['growth_ratio']} (peak, {c['n'][0]} -> {c['n'][1]}),"
            f" {c['bytes_per_record']} B per added record,"
            f" projected peak at 1M records: {c['projected_1m_records_mib']} MiB"
        )
    if "d" in res:
        rows = [
            [
                r["profile"],
                r["concurrency"],
                r.get("useful_over_capacity"),
                r.get("useful_no_faults"),
                r["gen_over_capacity"],
                r.get("gen_no_faults"),
                r["fill"],
                r["summary"]["requests"],
                sum(r["sim_faults"].values()),
                r.get("retries"),
                r.get("engine_errors"),
                r.get("cancelled"),
                r["completion_rate"],
                r["reported"],
                r["store_ids"],
                r["lost"],
                r["duplicates_on_disk"],
            ]
            for r in res["d"]["rows"]
        ]
        parts.append(
            "(d) 10% injected faults (every kind the sim has)\n"
            + table(
                [
                    "profile",
                    "limit",
                    "useful/cap",
                    "(no faults)",
                    "gen/cap",
                    "(no faults)",
                    "fill",
                    "requests",
                    "faults",
                    "retries",
                    "gave up",
                    "cancelled",
                    "completed",
                    "reported",
                    "on disk",
                    "lost",
                    "dups",
                ],
                rows,
            )
        )
    ratio = None
    if best:
        ratio = min(v[0] for v in best.values())
        detail = ", ".join(f"{p} {v[0]:.3f} at limit {v[1]}" for p, v in best.items())
        adaptive = [
            f"{r['profile']} {r['useful_over_capacity']:.3f}"
            for r in res["a"]["rows"]
            if r["adaptive"] and r.get("useful_over_capacity") is not None
        ]
        parts.append(
            f"best fixed limit per profile (useful/capacity): {detail}"
            + (f"; adaptive: {', '.join(adaptive)}" if adaptive else "")
        )
    return "\n\n".join(parts), ratio


async def main_async(args: argparse.Namespace) -> int:
    mode = MODES["ci" if args.ci else "quick" if args.quick else "full"]
    if args.profiles:
        mode.profiles = {k: v for k, v in mode.profiles.items() if k in args.profiles}
        mode.fault_profiles = [p for p in mode.fault_profiles if p in args.profiles]
    for flag in args.speedup:
        name, _, value = flag.partition("=")
        mode.profiles[name].speedup = float(value)
    for flag in args.concurrency:
        name, _, value = flag.partition("=")
        mode.profiles[name].concurrency = [int(x) for x in value.split(",")]
    sections = set(args.only or "abcd")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(mode, out_dir)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    res: dict[str, Any] = {
        "mode": mode.name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": {
            "profiles": {k: vars(v) for k, v in mode.profiles.items()},
            "window_s": mode.window_s,
            "post_n": mode.post_n,
            "mem_n": mode.mem_n,
            "fault_mix": FAULT_MIX,
        },
    }
    try:
        bench.tokens = mean_completion_tokens()
        res["settings"]["mean_completion_tokens"] = round(bench.tokens, 1)
        if "a" in sections or "d" in sections:
            log(f"capturing {mode.bodies_n} request bodies from a dry run ...")
            bodies = await dump_bodies(mode.bodies_n)
            bench.bodies_path = bench.tmp / "bodies.jsonl"
            bench.bodies_path.write_bytes(b"\n".join(bodies) + b"\n")
            res["settings"]["bodies"] = len(bodies)
        if "a" in sections:
            res["a"] = await section_a(bench, log)
        if "b" in sections:
            res["b"] = await section_b(bench, log)
        if "c" in sections:
            res["c"] = await section_c(bench, log)
        if "d" in sections:
            a_rows = res.get("a", {}).get("rows", [])
            best = {p: v[1] for p, v in best_settings(a_rows).items()}
            res["d"] = await section_d(bench, log, best, a_rows)
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    res["elapsed_s"] = round(time.time() - started, 1)
    res["machine"]["loadavg_end"] = os.getloadavg()
    text, ratio = report(res)
    res["useful_over_capacity"] = ratio
    path = out_dir / f"{mode.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    print(text)
    print(f"\nresults: {path} ({res['elapsed_s']}s)")
    if ratio is not None:
        print(f"useful/capacity: {ratio:.3f}")
    for name, value in goals(res).items():  # one line per goal (issue #16), for tracking
        print(f"{name}: {value}")
    return 0


def goals(res: dict[str, Any]) -> dict[str, str]:
    """The tracked figures, each a ratio or per-unit cost from this run ("n/a" if absent)."""
    out: dict[str, str] = {}
    rows = res.get("a", {}).get("rows", [])
    best = best_settings(rows)
    fills = []
    for profile in best:
        fixed = [r["fill"] for r in rows if r["profile"] == profile and r["client"] == "dreamgen"
                 and not r["adaptive"]]  # fmt: skip
        adaptive = [r["fill"] for r in rows if r["profile"] == profile and r["adaptive"]]
        if fixed and adaptive and max(fixed):
            fills.append(adaptive[0] / max(fixed))
    out["adaptive_fill_ratio"] = f"{min(fills):.3f}" if fills else "n/a"
    cpu = []  # client CPU per request, dreamgen ÷ the ideal replay client, same setting
    for r in rows:
        if r["client"] == "dreamgen" and not r["adaptive"]:
            for x in rows:
                if (x["client"], x["profile"], x["concurrency"]) == (
                    "ideal",
                    r["profile"],
                    r["concurrency"],
                ) and x["cpu_ms_per_request"]:
                    cpu.append(r["cpu_ms_per_request"] / x["cpu_ms_per_request"])
    out["cpu_vs_ideal"] = f"{max(cpu):.2f}" if cpu else "n/a"
    cores = [r["real_core_share_at_capacity"] for r in rows
             if r["client"] == "dreamgen" and r.get("real_core_share_at_capacity")]  # fmt: skip
    out["core_at_1x"] = f"{max(cores):.4f}" if cores else "n/a"
    total = res.get("b", {}).get("total", {})
    out["post_us_per_record"] = f"{total['cpu_us']:.1f}" if total else "n/a"
    c = res.get("c", {})
    out[f"rss_ratio_{c['n'][1]}_{c['n'][0]}" if c else "rss_ratio"] = (
        f"{c['growth_ratio']}" if c else "n/a"
    )
    out["xgrammar_mask_us_per_token"] = "n/a (bench/xgrammar_schemas.py; pip install xgrammar)"
    return out


def machine_info() -> dict[str, Any]:
    import dreamgen

    rev = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "dreamgen": dreamgen.__version__,
        "git": rev,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    speed = ap.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="reduced run, about a minute")
    speed.add_argument("--ci", action="store_true", help="tiny run, seconds (tests)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    ap.add_argument("--only", help="sections to run, e.g. 'ab' (default: abcd)")
    ap.add_argument("--profiles", nargs="*", help="limit to these sim profiles (8b, 1b, stress)")
    ap.add_argument(
        "--speedup",
        action="append",
        default=[],
        metavar="PROFILE=S",
        help="override a profile's speedup, e.g. 8b=10 (repeatable)",
    )
    ap.add_argument(
        "--concurrency",
        action="append",
        default=[],
        metavar="PROFILE=C,C",
        help="override a profile's fixed limits, e.g. 1b=1024,2048 (repeatable)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
