"""GPU benchmark: does dreamgen keep a real vLLM server as busy as vLLM can be kept?

On one GPU host, one model, the same N requests (dreamgen's exact request bodies):

  A1  vLLM's offline engine (``LLM.chat``) over all N requests: the ceiling.
  A2  a minimal aiohttp replayer against ``vllm serve`` at 256/512/1024/1536 requests in
      flight (the best level is kept): the best any client gets from the server.
  A3  dreamgen itself (the pipeline behind ``dreamgen build``) against the same server,
      stopped after N requests.
  A2' A2 at its best level without ``response_format``: the price of guided decoding.

Prints tokens/s for each and A3/A2, A3/A1 and guided/unguided; scrapes ``/metrics`` once
a second during every server phase; writes everything to OUT/gpu_bench.json.
Written against vLLM 0.11.0 (``StructuredOutputsParams``; ``GuidedDecodingParams`` is
used on versions before 0.10.2). See bench/gpu/README.md for the exact commands.

    python bench/gpu/gpu_bench.py run --model Qwen/Qwen2.5-7B-Instruct --n 4000 --out OUT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LEVELS = (256, 512, 1024, 1536)
# SamplingParams fields that a dreamgen body carries under the same name.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed",
                   "repetition_penalty", "presence_penalty", "frequency_penalty")  # fmt: skip


def dreamgen_config(path: str | None) -> dict[str, Any]:
    """The dreamgen config (TOML) as a dict, so the dump and A3 run the same settings."""
    if not path:
        return {}
    import tomllib

    return tomllib.loads(Path(path).read_text())


# ---- dump ------------------------------------------------------------------------------


def dump(model: str, n: int, out: Path, config: dict[str, Any]) -> list[bytes]:
    """dreamgen's first ``n`` request bodies, as sent, from a dry run (no GPU needed)."""
    from bench.run import dump_bodies

    bodies = asyncio.run(dump_bodies(n, config, model=model))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(b + b"\n" for b in bodies))
    return bodies


def unguided(bodies: list[bytes]) -> list[bytes]:
    """The same bodies without ``response_format``."""
    out = []
    for b in bodies:
        d = orjson.loads(b)
        d.pop("response_format", None)
        out.append(orjson.dumps(d))
    return out


# ---- A1: offline engine ----------------------------------------------------------------


def offline(model: str, bodies_path: Path, llm_args: dict[str, Any]) -> dict[str, Any]:
    """A1: all bodies through ``vllm.LLM.chat`` in one call (run in its own process)."""
    import vllm

    sp = importlib.import_module("vllm.sampling_params")
    guided: dict[str, Any] = {}

    def params(body: dict[str, Any]) -> Any:
        kw = {k: body[k] for k in SAMPLING_FIELDS if k in body}
        spec = (body.get("response_format") or {}).get("json_schema")
        if spec:
            name = spec.get("name", "schema")
            if name not in guided:  # one object per schema, as the server caches grammars
                if hasattr(sp, "StructuredOutputsParams"):  # vLLM >= 0.10.2
                    guided[name] = (
                        "structured_outputs",
                        sp.StructuredOutputsParams(json=spec["schema"]),
                    )
                else:
                    guided[name] = ("guided_decoding", sp.GuidedDecodingParams(json=spec["schema"]))
            field, value = guided[name]
            kw[field] = value
        return vllm.SamplingParams(**kw)

    bodies = [orjson.loads(ln) for ln in bodies_path.read_bytes().splitlines() if ln.strip()]
    llm = vllm.LLM(model=model, **llm_args)
    conversations = [b["messages"] for b in bodies]
    sampling = [params(b) for b in bodies]
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, sampling_params=sampling, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"requests": len(bodies), "completion_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "vllm": vllm.__version__}  # fmt: skip


# ---- server phases ---------------------------------------------------------------------


async def scrape_loop(url: str, timeline: list[list[float]]) -> None:
    """``/metrics`` once a second: [t, running, waiting, kv usage, generation tokens]."""
    from prometheus_client.parser import text_string_to_metric_families

    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                m: dict[str, float] = {}
                for fam in text_string_to_metric_families(text):
                    for s in fam.samples:
                        m[s.name] = m.get(s.name, 0.0) + s.value  # sum over engines
                kv = m.get("vllm:kv_cache_usage_perc", m.get("vllm:gpu_cache_usage_perc", 0.0))
                timeline.append([
                    round(time.monotonic() - t0, 2),
                    m.get("vllm:num_requests_running", 0.0),
                    m.get("vllm:num_requests_waiting", 0.0),
                    kv,
                    m.get("vllm:generation_tokens_total", 0.0),
                ])  # fmt: skip
            await asyncio.sleep(1.0)


def load_summary(timeline: list[list[float]]) -> dict[str, float]:
    busy = [row for row in timeline if row[1] > 0]
    if not busy:
        return {}
    return {
        "mean_running": round(sum(r[1] for r in busy) / len(busy), 1),
        "max_running": max(r[1] for r in busy),
        "mean_waiting": round(sum(r[2] for r in busy) / len(busy), 1),
        "mean_kv_usage": round(sum(r[3] for r in busy) / len(busy), 3),
    }


async def replay(url: str, bodies: list[bytes], inflight: int) -> dict[str, Any]:
    """A2: every body once, ``inflight`` at a time, non-streaming; tokens/s overall."""
    timeline: list[list[float]] = []
    scraper = asyncio.create_task(scrape_loop(url, timeline))
    it = iter(bodies)
    tokens = errors = 0
    connector = aiohttp.TCPConnector(limit=inflight + 64, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=3600, sock_connect=30)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def worker() -> None:
            nonlocal tokens, errors
            for body in it:  # a shared iterator: each body is sent once
                async with http.post(url + "/v1/chat/completions", data=body,
                                     headers=headers) as r:  # fmt: skip
                    raw = await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
                tokens += orjson.loads(raw)["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        wall = time.perf_counter() - t0
    scraper.cancel()
    await asyncio.gather(scraper, return_exceptions=True)
    return {"inflight": inflight, "requests": len(bodies), "errors": errors,
            "completion_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "load": load_summary(timeline), "timeline": timeline}  # fmt: skip


async def dreamgen_phase(
    url: str, model: str, n: int, concurrency: int, config: dict[str, Any], adaptive: bool
) -> dict[str, Any]:
    """A3: dreamgen's pipeline against the server, stopped after ``n`` requests."""
    from dreamgen.config import Config
    from dreamgen.pipeline import Run

    out = Path(tempfile.mkdtemp(prefix="dreamgen-a3-"))
    fields = {**config, "engine": "openai", "servers": [url], "model": model, "out": str(out),
              "count": None, "concurrency": concurrency, "adaptive": adaptive,
              "request_timeout_s": 3600}  # fmt: skip
    run = Run(Config.model_validate(fields))
    timeline: list[list[float]] = []
    scraper = asyncio.create_task(scrape_loop(url, timeline))

    async def stop_at_n() -> None:
        while run.summary.requests < n:
            await asyncio.sleep(0.05)
        run.stop("bench")

    stopper = asyncio.create_task(stop_at_n())
    t0 = time.perf_counter()
    summary = await run.run(grace_s=3600)
    wall = time.perf_counter() - t0
    for task in (scraper, stopper):
        task.cancel()
    await asyncio.gather(scraper, stopper, return_exceptions=True)
    s = summary.as_dict()
    return {"inflight": concurrency, "adaptive": adaptive, "requests": s["requests"],
            "completion_tokens": s["completion_tokens"], "accepted": s["accepted"],
            "accepted_tokens": s["accepted_tokens"], "rejected": s["rejected"], "wall_s": wall,
            "tok_s": s["completion_tokens"] / wall, "useful_tok_s": s["accepted_tokens"] / wall,
            "out": str(out), "load": load_summary(timeline), "timeline": timeline}  # fmt: skip


# ---- the server ------------------------------------------------------------------------


def start_server(model: str, port: int, serve_args: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = ["vllm", "serve", model, "--port", str(port), *shlex.split(serve_args)]
    print("starting:", shlex.join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}; see its log")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=5) as r:
            if r.status == 200:
                return
        time.sleep(2)
    raise SystemExit(f"{url} not healthy after {timeout_s:g}s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---- main ------------------------------------------------------------------------------


def cmd_run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dreamgen_config(a.config)
    bodies_path = out / "bodies.jsonl"
    print(f"dumping {a.n} request bodies (dry run) ...", flush=True)
    bodies = dump(a.model, a.n, bodies_path, config)
    res: dict[str, Any] = {"model": a.model, "n": len(bodies), "levels": a.levels}

    if not a.skip_offline:
        print("A1: offline engine (own process) ...", flush=True)
        a1 = out / "a1.json"
        subprocess.run([sys.executable, __file__, "offline", "--model", a.model, "--bodies",
                        str(bodies_path), "--out", str(a1), "--llm-args", a.llm_args],
                       check=True)  # fmt: skip
        res["A1"] = orjson.loads(a1.read_bytes())

    proc = None
    url = a.server.rstrip("/").removesuffix("/v1") if a.server else f"http://127.0.0.1:{a.port}"
    if not a.server:
        proc = start_server(a.model, a.port, a.serve_args, out / "vllm_serve.log")
    try:
        wait_healthy(url, proc, a.startup_timeout)
        print("warm-up (grammar compilation, CUDA graphs) ...", flush=True)
        asyncio.run(replay(url, bodies[: min(64, len(bodies))], 64))
        res["A2"] = []
        for level in a.levels:
            print(f"A2: replayer at {level} in flight ...", flush=True)
            res["A2"].append(asyncio.run(replay(url, bodies, level)))
        best = max(res["A2"], key=lambda r: r["tok_s"])
        c = a.a3_concurrency or best["inflight"]
        print(f"A3: dreamgen at {c} in flight{' (adaptive)' if a.adaptive else ''} ...", flush=True)
        res["A3"] = asyncio.run(dreamgen_phase(url, a.model, a.n, c, config, a.adaptive))
        print(f"A2': replayer at {best['inflight']} without response_format ...", flush=True)
        res["A2_unguided"] = asyncio.run(replay(url, unguided(bodies), best["inflight"]))
    finally:
        if proc is not None:
            stop_server(proc)

    a2, a3, a2u = best["tok_s"], res["A3"]["tok_s"], res["A2_unguided"]["tok_s"]
    res["ratios"] = {"A3/A2": a3 / a2, "guided/unguided": a2 / a2u}
    if "A1" in res:
        res["ratios"]["A3/A1"] = a3 / res["A1"]["tok_s"]
    (out / "gpu_bench.json").write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))

    print(f"\n{'phase':<34}{'tok/s':>10}{'mean running':>14}{'mean waiting':>14}")
    if "A1" in res:
        print(f"{'A1 offline LLM.chat':<34}{res['A1']['tok_s']:>10.0f}")
    for r in res["A2"]:
        mark = " *" if r is best else ""
        ld = r["load"]
        print(f"{'A2 replayer @' + str(r['inflight']) + mark:<34}{r['tok_s']:>10.0f}"
              f"{ld.get('mean_running', 0):>14}{ld.get('mean_waiting', 0):>14}")  # fmt: skip
    ld = res["A3"]["load"]
    print(f"{'A3 dreamgen @' + str(c):<34}{a3:>10.0f}"
          f"{ld.get('mean_running', 0):>14}{ld.get('mean_waiting', 0):>14}")  # fmt: skip
    print(f"{'   (useful: accepted tokens)':<34}{res['A3']['useful_tok_s']:>10.0f}")
    print(f"{'A2 unguided @' + str(best['inflight']):<34}{a2u:>10.0f}")
    for k, v in res["ratios"].items():
        print(f"{k}: {v:.3f}")
    print(f"results: {out / 'gpu_bench.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="dump, A1, then A2/A3/A2' against vllm serve")
    r.add_argument("--model", required=True, help="HF model id or path (same for all phases)")
    r.add_argument("--n", type=int, default=4000, help="requests per phase")
    r.add_argument("--out", default="bench/results/gpu")
    r.add_argument("--config", help="dreamgen TOML (sampling, plan) for the dump and A3")
    r.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=list(LEVELS))
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--server", help="use this running server instead of starting vllm serve")
    r.add_argument("--serve-args", default="", help="extra `vllm serve` arguments, quoted")
    r.add_argument("--llm-args", default="{}", help="JSON kwargs for vllm.LLM in A1")
    r.add_argument("--skip-offline", action="store_true", help="no A1 (e.g. with --server)")
    r.add_argument("--a3-concurrency", type=int, help="default: the best A2 level")
    r.add_argument("--adaptive", action="store_true", help="A3 with adaptive concurrency")
    r.add_argument("--startup-timeout", type=float, default=1800)
    d = sub.add_parser("dump", help="only write dreamgen's request bodies (no GPU)")
    d.add_argument("--model", required=True)
    d.add_argument("--n", type=int, default=4000)
    d.add_argument("--out", default="bench/results/gpu/bodies.jsonl")
    d.add_argument("--config")
    o = sub.add_parser("offline", help="A1 only (used by run, in its own process)")
    o.add_argument("--model", required=True)
    o.add_argument("--bodies", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--llm-args", default="{}")
    a = ap.parse_args()
    if a.cmd == "run":
        cmd_run(a)
    elif a.cmd == "dump":
        bodies = dump(a.model, a.n, Path(a.out), dreamgen_config(a.config))
        print(f"wrote {len(bodies)} bodies to {a.out}")
    else:
        res = offline(a.model, Path(a.bodies), orjson.loads(a.llm_args))
        Path(a.out).write_bytes(orjson.dumps(res))
        print(f"A1: {res['tok_s']:.0f} tok/s over {res['requests']} requests")


if __name__ == "__main__":
    main()
