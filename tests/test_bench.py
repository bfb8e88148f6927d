"""bench/run.py runs end to end in its reduced CI mode, so the benchmark never rots.

No timing is asserted (CI machines vary): only that every section runs, the output has
its shape, and what must hold whatever the speed does hold — no record reported accepted
is missing from the store, none is stored twice, and the captured request bodies are
what dreamgen sends.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ci_mode_runs_every_section(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--ci", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    (useful,) = [ln for ln in lines if ln.startswith("useful/capacity: ")]
    float(useful.split(": ", 1)[1])
    # It ends with one line per tracked goal, NAME: VALUE.
    names = [ln.split(": ", 1)[0] for ln in lines[-6:]]
    assert names[:4] == ["adaptive_fill_ratio", "cpu_vs_ideal", "core_at_1x", "post_us_per_record"]
    assert names[4].startswith("rss_ratio_") and names[5] == "xgrammar_mask_us_per_token"
    assert float(lines[-3].split(": ")[1]) > 0  # post_us_per_record, from the stage chain
    for heading in ("(a) end to end", "(b) post-processing", "(c) peak memory", "(d) 10%"):
        assert heading in proc.stdout

    (path,) = tmp_path.glob("ci-*.json")
    res = orjson.loads(path.read_bytes())
    rows = res["a"]["rows"]
    clients = {(r["client"], r["adaptive"]) for r in rows}
    assert {("dreamgen", False), ("ideal", False)} <= clients
    if res["a"]["adaptive"] == "ok":
        assert ("dreamgen", True) in clients
    for r in rows:
        assert r["requests_done"] > 0
        assert 0 < r["gen_over_capacity"] <= 1.2
        assert 0 < r["fill"] <= 1.0
        assert r["cpu_ms_per_request"] > 0
    dg = next(r for r in rows if r["client"] == "dreamgen" and not r["adaptive"])
    assert 0 <= dg["useful_over_capacity"] <= dg["gen_over_capacity"]
    assert dg["over_ideal"] > 0

    stages = res["b"]["stages"]
    assert list(stages) == ["label", "filter", "copies", "split", "dedup", "pairs", "store"]
    assert all(v["cpu_us"] > 0 for v in stages.values())
    assert res["b"]["total"]["accepted"] > 0

    mem = res["c"]
    assert mem["growth_ratio"] > 0
    assert all(mem[str(n)]["peak_kb"] > 0 for n in mem["n"])

    (fault_row,) = res["d"]["rows"]
    assert sum(fault_row["sim_faults"].values()) > 0  # faults were injected ...
    assert fault_row["reported"] > 0
    assert fault_row["lost"] == 0  # ... and nothing reported accepted went missing
    assert fault_row["duplicates_on_disk"] == 0
    assert fault_row["store_ids"] == fault_row["reported"]


def test_dump_bodies_are_what_dreamgen_sends() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.run import dump_bodies
    from dreamgen.scenario import response_format

    bodies = [orjson.loads(b) for b in asyncio.run(dump_bodies(12, model="my-model"))]
    assert len(bodies) == 12
    for body in bodies:
        assert body["model"] == "my-model"
        assert body["stream"] is False
        assert body["messages"][0]["role"] == "system"
        assert body["messages"][-1]["role"] == "user"
        # A vLLM server gets the schema without string length bounds (xgrammar is ~2x
        # faster without them); the embedded llama.cpp engine keeps the bounded form.
        assert body["response_format"] == response_format("scenario", "unbounded")
        assert b"maxLength" not in orjson.dumps(body["response_format"])
        assert body["max_tokens"] > 0
    # A byte-identical system prompt leads most requests (vLLM's prefix cache).
    assert len({b["messages"][0]["content"][:200] for b in bodies}) == 1


def test_gpu_script_runs_against_the_sim(tmp_path: Path) -> None:
    """bench/gpu's server phases (A2, A3, A2') against the sim standing in for vllm serve.

    A1 needs vLLM and a GPU and is skipped; everything else is the code a GPU host runs.
    """
    sys.path.insert(0, str(ROOT))
    from fake_vllm import SimProcess

    model = "Qwen/Qwen2.5-7B-Instruct"
    args = ("--profile", "8b", "--speedup", "50", "--slots", "16", "--model", model)
    with SimProcess(*args) as sim:
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "gpu" / "gpu_bench.py"),
                "run",
                "--model",
                model,
                "--n",
                "40",
                "--levels",
                "8,24",
                "--server",
                sim.url,
                "--skip-offline",
                "--out",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "A3/A2: " in proc.stdout and "guided/unguided: " in proc.stdout
    res = orjson.loads((tmp_path / "gpu_bench.json").read_bytes())
    assert [r["inflight"] for r in res["A2"]] == [8, 24]
    assert all(r["requests"] == 40 and r["errors"] == 0 for r in res["A2"])
    assert res["A3"]["requests"] >= 40
    assert len((tmp_path / "bodies.jsonl").read_bytes().splitlines()) == 40
    bodies = [orjson.loads(b) for b in (tmp_path / "bodies.jsonl").read_bytes().splitlines()]
    assert all(b["model"] == model and "response_format" in b for b in bodies)
