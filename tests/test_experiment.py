"""`dreamgen experiment`: a 2-step run on the real SmolLM2, and every bad input as one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import conftest  # noqa: E402

from dreamgen.decision import GROUPS  # noqa: E402
from dreamgen.experiment import ExperimentConfig, run_experiment  # noqa: E402
from dreamgen.objectives import TrainSettings  # noqa: E402
from dreamgen.probe import ProbeResult, probe  # noqa: E402
from dreamgen.qproj import apply_qproj  # noqa: E402
from dreamgen.training import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "tests" / "data" / "dev.jsonl"

# (earlier assistant idea, decision turn, cue, listening, reflex): written for this test
TRAIN = [
    ("We could move the cron job to Airflow.", "Keep cron. Just fix the timezone bug.",
     "Keep cron", "Setting TZ=UTC in the crontab.", "Let us start with an Airflow DAG."),
    ("A Redis cache would speed this up.", "No cache. Only add the missing index.",
     "Only add the missing index", "CREATE INDEX ON orders(user_id);", "First, Redis."),
    ("I can rewrite the parser in Rust.", "Stay in Python and handle the empty line.",
     "Stay in Python", "Skip lines where line.strip() is empty.", "Here is a Rust crate."),
    ("Should we add type hints everywhere?", "Not now; rename the variable and stop.",
     "rename the variable and stop", "Renamed tmp to total.", "Type hints first."),
]  # fmt: skip


def write_train(path: Path) -> Path:
    lines = []
    for i, (idea, direction, cue, listening, reflex) in enumerate(TRAIN):
        record = conftest.make_record(
            [("assistant", idea), ("user", direction)],
            listening,
            reflex,
            [(1, cue)],
            [(0, idea.rstrip(".?"))],
            rid=f"train-{i}",
        )
        lines.append(orjson.dumps(record.model_dump(mode="json")))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_heldout(path: Path, n: int) -> Path:
    path.write_bytes(b"\n".join(DEV.read_bytes().splitlines()[:n]) + b"\n")
    return path


def check_sums(probe_json: Path) -> None:
    result = ProbeResult.model_validate_json(probe_json.read_bytes())
    for r in range(result.n_records):
        for layer in range(result.num_layers):
            total = sum(result.record_mass[g][r][layer] for g in GROUPS)
            assert total == pytest.approx(1.0, abs=1e-4)


def test_two_step_experiment_on_smollm2(tmp_path):
    loaded = load_model("smollm2")
    out = tmp_path / "exp"
    cfg = ExperimentConfig(
        data=write_train(tmp_path / "train.jsonl"),
        heldout=write_heldout(tmp_path / "heldout.jsonl", 4),
        out=out,
        train=TrainSettings(steps=2, batch_size=2, lr=1e-3),
        n_boot=100,
    )
    log: list[str] = []
    run_experiment(cfg, log.append, loaded=loaded)
    report = orjson.loads((out / "report.json").read_bytes())
    assert report["n_train"] == 4 and report["n_heldout"] == 4
    q_proj = {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(30)}
    for objective in ("lm", "pref", "attn"):
        obj = report["objectives"][objective]
        for measure in ("direction_share", "control_lift"):
            m = obj["heldout"][measure]
            assert {"before", "after", "diff", "ci_low", "ci_high", "per_layer"} <= set(m)
            assert len(m["per_layer"]) == 30 and m["n"] == 4
            assert m["ci_low"] <= m["diff"] <= m["ci_high"]
        assert len(obj["train"]["loss"]) == 2
        assert set(obj["changed_parameters"]) == q_proj  # only q_proj changed, all of them
        for name in ("compare.json", "compare.png", "loss.png", "qproj.safetensors"):
            assert (out / objective / name).is_file(), name
        check_sums(out / objective / "probe" / "probe.json")
    check_sums(out / "base" / "probe.json")
    assert report["objectives"]["attn"]["train"]["attn_layers"] == list(range(20))
    assert any("train pref: step 2/2" in line for line in log)  # progress was shown
    # held out means held out: no probed id is a training id
    base = ProbeResult.model_validate_json((out / "base" / "probe.json").read_bytes())
    assert not set(base.record_ids) & {f"train-{i}" for i in range(4)}
    # the saved q_proj on the base model reproduces the after-probe
    model, tokenizer = loaded
    apply_qproj(model, out / "lm" / "qproj.safetensors")
    again = probe(model, cfg_heldout(cfg), tokenizer=tokenizer)
    after = ProbeResult.model_validate_json((out / "lm" / "probe" / "probe.json").read_bytes())
    for g in GROUPS:
        assert torch.allclose(
            torch.tensor(again.record_mass[g]), torch.tensor(after.record_mass[g]), atol=1e-6
        ), g


def cfg_heldout(cfg: ExperimentConfig):
    from dreamgen.decision import read_conversations

    return read_conversations(cfg.heldout)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "dreamgen", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2; the last stderr line is the only ``error:`` line (progress may precede it)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_inputs_are_one_line_errors(tmp_path):
    train = write_train(tmp_path / "train.jsonl")
    out = str(tmp_path / "out")
    first = orjson.loads(DEV.read_bytes().splitlines()[0])

    moved = {**first, "cues": [{**first["cues"][0], "start": first["cues"][0]["start"] + 2}]}
    bad = tmp_path / "offsets.jsonl"
    bad.write_bytes(DEV.read_bytes().splitlines()[1] + b"\n" + orjson.dumps(moved) + b"\n")
    proc = run_cli("experiment", str(train), "--heldout", str(bad), "--out", out)
    assert_one_line_error(proc, "offsets.jsonl:2", "cues.0.text")

    in_assistant = {**first, "cues": [{**first["distractors"][0], "kind": "explicit_instruction"}]}
    bad.write_bytes(orjson.dumps(in_assistant) + b"\n")
    proc = run_cli("experiment", str(train), "--heldout", str(bad), "--out", out)
    assert_one_line_error(proc, "offsets.jsonl:1", "cues.0.message", "assistant message")

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    proc = run_cli("experiment", str(train), "--heldout", str(empty), "--out", out)
    assert_one_line_error(proc, "no conversations")
    heldout = write_heldout(tmp_path / "heldout.jsonl", 3)
    proc = run_cli("experiment", str(empty), "--heldout", str(heldout), "--out", out)
    assert_one_line_error(proc, "no training records")

    # a training record that reuses a held-out conversation's decision turn
    leak = conftest.make_record(
        [("assistant", "Shall I port it?"), ("user", first["messages"][-1]["content"])],
        "Sure.",
        "Porting.",
        [(1, first["cues"][0]["text"])],
        rid="leak",
    )
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_bytes(train.read_bytes() + orjson.dumps(leak.model_dump(mode="json")) + b"\n")
    proc = run_cli("experiment", str(leaky), "--heldout", str(heldout), "--out", out)
    assert_one_line_error(proc, "not disjoint", "dev-001")

    proc = run_cli("experiment", str(train), "--heldout", str(heldout), "--out", out,
                   "--objective", "sft")  # fmt: skip
    assert_one_line_error(proc, "--objective")
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_model_that_cannot_load_is_one_line(tmp_path):
    train = write_train(tmp_path / "train.jsonl")
    heldout = write_heldout(tmp_path / "heldout.jsonl", 2)
    (tmp_path / "empty-model").mkdir()
    for model in (str(tmp_path / "missing.gguf"), str(tmp_path / "empty-model")):
        proc = run_cli("experiment", str(train), "--heldout", str(heldout),
                       "--out", str(tmp_path / "out"), "--model", model)  # fmt: skip
        assert_one_line_error(proc, "model", model)
    proc = run_cli("probe", str(tmp_path / "empty-model"), str(heldout))
    assert_one_line_error(proc, "cannot load model")
