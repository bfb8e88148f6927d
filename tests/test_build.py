"""`dreamgen build` as a real subprocess: the embedded model end to end, and user errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
from cli import dreamgen, one_error_line
from conftest import DEMO_COUNT
from fake_vllm import SimProcess

from dreamgen.audit import audit
from dreamgen.record import Record

ROOT = Path(__file__).resolve().parent.parent


def records(out: Path) -> list[Record]:
    lines = b"".join(p.read_bytes() for p in sorted((out / "shards").glob("part-*.jsonl")))
    return [Record.model_validate_json(line) for line in lines.splitlines()]


def test_build_on_the_embedded_model_end_to_end(demo_build: tuple[Path, str]) -> None:
    out, stdout = demo_build
    assert "build summary" in stdout and "accepted_tokens_per_s" in stdout
    got = records(out)
    assert len(got) == DEMO_COUNT
    for r in got:
        assert r.provenance.engine == "embedded" and r.provenance.model == "SmolLM2-135M-Instruct"
        for sp in r.cues + r.distractors:
            assert r.content_of(sp.message)[sp.start : sp.end] == sp.text
    valid, problems = audit(out)
    assert (valid, problems) == (DEMO_COUNT, [])
    check = dreamgen("validate", str(out))
    assert check.returncode == 0, check.stdout
    assert f"{DEMO_COUNT} valid records, 0 problems" in check.stdout
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["records"] == DEMO_COUNT and manifest["totals"]["completion_tokens"] > 0


def test_unreachable_server(tmp_path: Path) -> None:
    proc = dreamgen(
        "build", "--server", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "o")
    )
    assert "cannot reach http://127.0.0.1:9" in one_error_line(proc)


def test_wrong_model_name_lists_what_is_served(tmp_path: Path) -> None:
    with SimProcess("--profile", "stress") as sim:
        proc = dreamgen("build", "--server", sim.url, "--model", "nope", "--out", str(tmp_path))
    line = one_error_line(proc)
    assert "'nope' is not served" in line and sim.model in line


def test_malformed_seed_card(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    subprocess.run(["cp", "-r", str(ROOT / "dreamgen" / "prompts"), str(prompts)], check=True)
    (prompts / "broken.yaml").write_text("id: broken\ntitle: a: b\n")
    config = tmp_path / "c.toml"
    config.write_text(f'prompts = "{prompts}"\n')
    proc = dreamgen("build", "--config", str(config), "--out", str(tmp_path / "o"))
    assert "broken.yaml:2: YAML error" in one_error_line(proc)


def test_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = dreamgen("build", "--out", str(blocker / "sub"))
    assert "cannot write to" in one_error_line(proc)


def test_bad_config_value(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("concurrency = 0\n")
    proc = dreamgen("build", "--config", str(config), "--out", str(tmp_path / "o"))
    assert "concurrency" in one_error_line(proc)


def test_ctrl_c_keeps_every_record_written(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with SimProcess("--profile", "8b", "--speedup", "20") as sim:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dreamgen",
                "build",
                "--server",
                sim.url,
                "--model",
                sim.model,
                "--count",
                "100000",
                "--out",
                str(out),
                "--quiet",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((out / "shards").glob("*.open")):
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    valid, problems = audit(out)
    assert problems == [] and valid > 0
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["records"] == valid
    assert os.path.exists(out / "dedup" / "signatures.bin")
