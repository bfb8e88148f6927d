"""Runs that end: the yield breaker against a simulated vLLM server that never gives a keeper.

Issue 18: with every answer malformed, `build --count 5` made 197k requests in 180 s at
yield 0 and never stopped; the same for every answer a duplicate. Each case here runs the
real CLI as a subprocess against `tests/fake_vllm.py` in its own process, with the
breaker's defaults (it is on by default), and must end promptly with exit 2 and one line.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from fake_vllm import SimProcess
from test_daemon import daemon, post, wait_for

from dreamgen.breaker import BreakerConfig, YieldBreaker
from dreamgen.cards import PROMPTS_DIR

ROOT = Path(__file__).resolve().parent.parent


def build(
    out: Path, url: str, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dreamgen", "build", "--out", str(out), "--quiet"]
    cmd += ["--server", url, "--model", "dreamgen-sim", "--concurrency", "32", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def durable(out: Path) -> int:
    shards = sorted((out / "shards").glob("part-*.jsonl*"))
    return sum(len(p.read_bytes().splitlines()) for p in shards)


def test_every_answer_malformed_ends_the_build(tmp_path: Path) -> None:
    with SimProcess("--profile", "stress", "--fault", "malformed=1") as sim:
        t0 = time.monotonic()
        proc = build(tmp_path / "out", sim.base_url, "--count", "5")
        took = time.monotonic() - t0
        requests = sim.stats()["requests_received"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "answers in a row were rejected" in line, line
    assert "top rejection reasons: invalid_json" in line, line
    assert took < 120, took
    # Default max_without_accept is 300; what was in flight when it opened adds a little.
    assert requests < 300 + 2 * 32 + 10, requests


@pytest.mark.parametrize("fault", ["surrogate", "deep"])
def test_every_answer_hostile_json_ends_the_build(tmp_path: Path, fault: str) -> None:
    """Lone surrogates in every string, or an array 100,000 deep: each answer is one
    counted rejection (no traceback, no crash), and the breaker ends the run."""
    with SimProcess("--profile", "stress", "--fault", f"{fault}=1") as sim:
        proc = build(tmp_path / "out", sim.base_url, "--count", "5")
        requests = sim.stats()["requests_received"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "answers in a row were rejected" in line, line
    assert requests < 300 + 2 * 32 + 10, requests
    manifest = orjson.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert manifest["totals"]["records"] == 0
    # orjson refuses both (surrogates are not UTF-8; it stops at 1024 levels).
    rejected = manifest["totals"]["rejected"]
    assert set(rejected) == {"invalid_json"} and rejected["invalid_json"] >= 300, rejected


def test_every_answer_a_duplicate_ends_the_build_and_keeps_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # --no-unique: the 30 corpus scenarios verbatim, round robin; after them, only repeats.
    with SimProcess("--profile", "stress", "--no-unique") as sim:
        proc = build(out, sim.base_url, "--count", "500")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "answers in a row were rejected" in line and "duplicate" in line, line
    kept = durable(out)
    assert 0 < kept <= 30, kept
    assert f"{kept} records are durable" in line, line
    # What was reported is on disk and the folder verifies.
    check = subprocess.run(
        [sys.executable, "-m", "dreamgen", "validate", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]


def test_the_breaker_can_be_turned_off(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[breaker]\nenabled = false\n")
    with SimProcess("--profile", "stress", "--fault", "malformed=1") as sim:
        cmd = [sys.executable, "-m", "dreamgen", "build", "--out", str(tmp_path / "out")]
        cmd += ["--quiet", "--server", sim.base_url, "--model", "dreamgen-sim"]
        cmd += ["--count", "5", "--concurrency", "32", "--config", str(config)]
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: sim.stats()["requests_received"] > 1000, 120, "1000 requests")
            assert p.poll() is None  # still going: nothing stops it but a signal
        finally:
            p.terminate()
            p.wait(timeout=60)


def test_daemon_goes_not_ready_says_why_and_recovers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with SimProcess("--profile", "stress", "--fault", "malformed=1") as sim:
        config = tmp_path / "d.toml"
        config.write_text(
            f'engine = "openai"\nservers = ["{sim.base_url}"]\nmodel = "dreamgen-sim"\n'
            f'concurrency = 8\nprompts = "{PROMPTS_DIR}"\ncount = 100000\n'
            "[serving]\nhealth_interval_s = 0.2\n"
            "[breaker]\nmax_without_accept = 20\nbackoff_s = 1.5\nbackoff_max_s = 3\n"
        )
        with daemon(tmp_path, config, out) as d:
            _, body = wait_for(
                lambda: (r := d.get("/readyz"))[0] == 503 and "yield breaker" in r[1] and r,
                60,
                "/readyz names the breaker",
            )
            assert "answers in a row were rejected" in body and "invalid_json" in body, body
            logged = [e for e in d.events() if "yield breaker open" in e.get("msg", "")]
            assert logged and logged[0].get("level") in ("error", "ERROR"), logged[:1]
            # It backs off: over 3 s at most a couple of retries of ~20 requests each (the
            # pause doubles 1.5 s -> 3 s); without the breaker this server takes thousands.
            before = sim.stats()["requests_received"]
            time.sleep(3.0)
            assert sim.stats()["requests_received"] - before < 100
            post(sim.url + "/sim/faults", {"rates": {}})  # the server is fixed
            d.wait_ready(60)
            wait_for(lambda: d.value("dreamgen_records_accepted_total") >= 1, 60, "a record kept")
            assert d.stop() == 0


def test_window_rule_opens_on_a_low_yield_without_a_long_streak() -> None:
    cfg = BreakerConfig(max_without_accept=1000, window=100, min_yield=0.05)
    breaker = YieldBreaker(cfg)
    opened = None
    for i in range(100):  # 4 kept in 100 (4% < 5%), never more than 30 rejections in a row
        opened = breaker.observe(None if i % 25 == 0 else "invalid_json") or opened
    assert opened is not None and "only 4 of the last 100" in opened, opened
    breaker = YieldBreaker(cfg)
    results = [breaker.observe(None if i % 20 == 0 else "duplicate") for i in range(500)]
    assert not any(results)  # 5 in 100 kept: at the bound, not below it


def test_breaker_config_refuses_nonsense() -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ({"min_yield": float("nan")}, {"backoff_s": float("inf")}, {"window": 0}):
        with pytest.raises(ValidationError):
            BreakerConfig.model_validate(bad)
    assert orjson.loads(BreakerConfig().model_dump_json())["enabled"] is True
