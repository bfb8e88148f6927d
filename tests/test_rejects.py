"""The rejected-answer sample, the time series and the report: unit checks, and a real
`dreamgen build` against the simulated vLLM server with faults that force rejections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from fake_vllm import SimProcess

import dreamgen
from dreamgen.audit import audit
from dreamgen.rejects import REJECTED, RejectSample, read_rejected
from dreamgen.request import Request
from dreamgen.timeseries import TIMESERIES, TimeSeries, read_timeseries

ROOT = Path(__file__).resolve().parent.parent


def request(card: str = "c1") -> Request:
    return Request(
        index=0,
        card=card,
        mode="directed",
        schema_name="scenario",
        axes=None,
        difficulty=2,
        cell=None,
        messages=[{"role": "system", "content": "S" * 50}, {"role": "user", "content": "seed"}],
        prompt_hash="p",
    )


def test_sample_keeps_the_newest_per_reason_within_count_and_bytes(tmp_path: Path) -> None:
    sample = RejectSample(tmp_path, per_reason=3, max_bytes=4096, max_answer_chars=100)
    for i in range(10):
        sample.add("invalid_json", request(), f"answer {i} " + "x" * 500, message=f"m{i}")
    sample.add("schema", request("c2"), "{}")
    sample.flush(force=True)
    kept = list(read_rejected(tmp_path, "invalid_json"))
    assert [e.message for e in kept] == ["m7", "m8", "m9"]
    assert all(len(e.raw) == 100 and e.raw_chars == 509 for e in kept)
    assert kept[0].request_messages[1] == {"role": "user", "content": "seed"}
    assert sample.counts() == {"invalid_json": 3, "schema": 1}
    # bytes cap: entries of ~600 bytes under a 1024-byte cap leave the newest one only
    small = RejectSample(tmp_path / "b", per_reason=50, max_bytes=1024, max_answer_chars=10_000)
    for i in range(5):
        small.add("too_short", request(), "y" * 600, message=str(i))
    small.flush(force=True)
    path = tmp_path / "b" / REJECTED / "too_short.jsonl"
    assert path.stat().st_size <= 1024 or len(path.read_bytes().splitlines()) == 1
    assert [e.message for e in read_rejected(tmp_path / "b")] == ["4"]
    # no temp files left behind: replaced atomically
    assert sorted(p.name for p in (tmp_path / REJECTED).iterdir()) == [
        "invalid_json.jsonl",
        "schema.jsonl",
    ]


def test_a_reopened_sample_goes_on_from_disk_and_skips_bad_lines(tmp_path: Path) -> None:
    first = RejectSample(tmp_path, per_reason=4)
    first.add("schema", request(), "a", message="old")
    first.flush(force=True)
    with open(tmp_path / REJECTED / "schema.jsonl", "ab") as f:
        f.write(b"{torn\n")
    again = RejectSample(tmp_path, per_reason=4)
    again.add("schema", request(), "b", message="new")
    again.flush(force=True)
    assert [e.message for e in read_rejected(tmp_path, "schema")] == ["old", "new"]


def test_flush_is_rate_limited_but_force_writes(tmp_path: Path) -> None:
    sample = RejectSample(tmp_path, write_interval_s=3600)
    sample.add("schema", request(), "a")
    sample.flush(force=True)
    sample.add("schema", request(), "b")
    sample.flush()  # within the interval: not yet
    assert len(list(read_rejected(tmp_path))) == 1
    sample.flush(force=True)
    assert len(list(read_rejected(tmp_path))) == 2


def test_timeseries_appends_and_skips_a_torn_line(tmp_path: Path) -> None:
    ts = TimeSeries(tmp_path, interval_s=3600)
    assert ts.maybe_append({"requests": 4, "accepted": 2}, force=True)
    assert not ts.maybe_append({"requests": 5, "accepted": 3})
    with open(tmp_path / TIMESERIES, "ab") as f:
        f.write(b'{"t": 1')
    points = read_timeseries(tmp_path)
    assert len(points) == 1 and points[0]["requests"] == 4 and points[0]["accepted"] == 2


@pytest.fixture(scope="module")
def faulty_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("rej") / "out"
    cfg = out.parent / "c.toml"
    cfg.write_text("[store]\nshard_records = 10\n")
    faults = ("--fault", "malformed=0.2", "--fault", "wrong_schema=0.1")
    with SimProcess("--profile", "8b", "--speedup", "50", *faults) as sim:
        proc = subprocess.run(
            [sys.executable, "-m", "dreamgen", "build", "--server", sim.url, "--model", sim.model,
             "--count", "30", "--out", str(out), "--config", str(cfg), "--quiet", "--seed", "3"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_build_keeps_rejected_answers_apart_from_the_data(faulty_build: tuple[Path, str]) -> None:
    out, _ = faulty_build
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    rejected = manifest["totals"]["rejected"]
    assert rejected.get("invalid_json", 0) > 0, rejected
    kept = list(read_rejected(out))
    by_reason: dict[str, int] = {}
    for e in kept:
        by_reason[e.reason] = by_reason.get(e.reason, 0) + 1
        assert e.request_messages and e.card  # the request that produced it
    assert manifest["rejected_sample"] == by_reason
    for e in read_rejected(out, "invalid_json"):
        with pytest.raises(orjson.JSONDecodeError):  # the answer as the model sent it
            orjson.loads(e.raw)
    # never training data: validate, read and the manifest's records see shards only
    valid, problems = audit(out)
    assert problems == [] and valid == manifest["records"] >= 30
    assert len(list(dreamgen.read(out))) == valid


def test_build_prints_coverage_and_the_report_path(faulty_build: tuple[Path, str]) -> None:
    out, stdout = faulty_build
    assert "coverage (filled / quota" in stdout
    report = out / "report" / "report.html"
    assert f"report: {report}" in stdout.replace("\n", "")
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 4  # self-contained: images embedded
    for png in ("coverage.png", "distributions.png", "rejections.png", "timeseries.png"):
        assert (out / "report" / png).stat().st_size > 1000, png
    points = read_timeseries(out)
    assert points and points[-1]["accepted"] >= 30
