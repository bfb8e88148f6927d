"""examples/train_wq.py as a real subprocess: a few steps on SmolLM2 change q_proj only."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import conftest

from dreamgen.record import Record

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_wq.py"


def make_record(rid: str, direction: str, cue: str, split: str) -> Record:
    """A two-turn scenario with one cue in the decision turn."""
    return conftest.make_record(
        [("assistant", "We could also port this to Go for speed."), ("user", direction)],
        "Understood, only that change.",
        "Porting it to Go first.",
        [(1, cue)],
        [(0, "port this to Go")],
        rid=rid,
        split=split,
        difficulty=1,
        axes={
            "cue_kind": "scope_limit",
            "distractor_kind": "better_tool",
            "domain": "operations",
            "emotion": "tired",
            "momentum": "winding_down",
        },
    )


def write_data(path: Path) -> Path:
    records = [
        make_record(
            "t1", "No Go. Only bump the timeout to 30 s.", "Only bump the timeout", "train"
        ),
        make_record("t2", "Stay in Python and just add the retry.", "Stay in Python", "train"),
        make_record(
            "t3", "Keep the script; fix the log path only.", "fix the log path only", "train"
        ),
        make_record(
            "p1", "Not now. Just rename the flag, nothing else.", "Just rename the flag", "probe"
        ),
        make_record(
            "p2", "Leave the language alone and fix the typo.", "Leave the language alone", "probe"
        ),
    ]
    path.write_bytes(b"".join(orjson.dumps(r.model_dump(mode="json")) + b"\n" for r in records))
    return path


def run_script(tmp_path: Path, *extra: str) -> dict:
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [
        sys.executable, str(SCRIPT), str(data), "--out", str(out), "--steps", "2",
        "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--param-diff", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all " in proc.stdout  # the per-layer before/after table was printed
    for name in ("results.json", "compare.json", "before/probe.json", "after/probe.png"):
        assert (out / name).is_file(), name
    return json.loads((out / "results.json").read_text())


def check_only_q_proj_changed(results: dict) -> None:
    assert results["n_train"] == 3
    assert len(results["losses"]) == 2
    assert len(results["trainable"]) == 30  # one q_proj per layer
    assert all(".q_proj." in name for name in results["trainable"])
    assert set(results["changed"]) == set(results["trainable"])
    assert len(results["compare"]["metrics"]["direction_share"]["per_layer"]) == 30
    assert results["compare"]["n_records"] == 2  # the probe split
    assert results["before_direction_share"] != results["after_direction_share"]


def test_adamw_trains_q_proj_only(tmp_path):
    check_only_q_proj_changed(run_script(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("apollo_torch") is None, reason="no apollo-torch")
def test_apollo_optimizer_steps_matrices_and_vectors():
    import torch

    spec = importlib.util.spec_from_file_location("train_wq", SCRIPT)
    assert spec is not None and spec.loader is not None
    train_wq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_wq)
    args = train_wq.parse_args(["data.jsonl", "--optimizer", "apollo", "--apollo-rank", "2"])
    layer = torch.nn.Linear(8, 8)
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer = train_wq.make_optimizer(list(layer.parameters()), train_wq.settings_of(args))
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, layer.parameters(), strict=True))
