"""Ray executor scaling against simulated vLLM replicas: accepted records/s at 1, 2 and 4
workers, as ratios to 1 worker, beside the local executor (Ray's overhead per record).

    python bench/ray_scale.py [--count 300] [--replicas 4]

Each build runs as a `dreamgen build` subprocess against the same replicas (each its own
process, profile 8b sped up), on a local Ray cluster started here. On a 2-core machine the
driver, the workers, Ray and the replicas share two cores: the ceiling is the CPU, not the
replicas; the figures show the overhead and whether adding workers helps before that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_vllm import SimProcess  # noqa: E402


def _stats(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/sim/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def _build(out: Path, urls: list[str], model: str, count: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "dreamgen", "build", "--out", str(out), "--count", str(count),
           "--model", model, "--quiet", "--json", "--concurrency", "64", *extra]  # fmt: skip
    for url in urls:
        cmd += ["--server", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["accepted_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f}", flush=True)
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = 6390
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=8", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True)  # fmt: skip
    rows = []
    try:
        with contextlib.ExitStack() as stack:
            sims = [
                stack.enter_context(SimProcess("--profile", "8b", "--speedup", "20"))
                for _ in range(args.replicas)
            ]
            urls, model = [s.url for s in sims], sims[0].model
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                local = _build(Path(tmp, "local"), urls, model, args.count, [])
                rows.append({"executor": "local", "workers": 0, "accepted_per_s": local})
                print(json.dumps(rows[-1]), flush=True)
                for w in (int(x) for x in args.workers.split(",")):
                    before = [_stats(u) for u in urls]
                    rate = _build(Path(tmp, f"ray{w}"), urls, model, args.count,
                                  ["--executor", "ray", "--ray-address", f"127.0.0.1:{port}",
                                   "--workers", str(w)])  # fmt: skip
                    after = [_stats(u) for u in urls]
                    served = [a.get("requests_received", 0) - b.get("requests_received", 0)
                              for a, b in zip(after, before, strict=True)]  # fmt: skip
                    rows.append({"executor": "ray", "workers": w, "accepted_per_s": rate,
                                 "requests_per_replica": served})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                wall = time.perf_counter() - t0
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
    one = next(r["accepted_per_s"] for r in rows if r["workers"] == 1)
    print(f"{'executor':8} {'workers':>7} {'acc/s':>8} {'÷1 worker':>9} {'÷local':>7}")
    for r in rows:
        print(f"{r['executor']:8} {r['workers']:7} {r['accepted_per_s']:8.2f} "
              f"{r['accepted_per_s'] / one:9.2f} {r['accepted_per_s'] / local:7.2f}")  # fmt: skip
    print(f"wall: {wall:.0f}s  load: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
