"""Build progress as a person sees it: a live bar on a terminal, log lines elsewhere.

`dreamgen build` runs as a real subprocess against the simulated vLLM server
(tests/fake_vllm.py) injecting 503s and 429s. Each run is stopped with SIGINT once records
flow, so the drain (in-flight requests finishing after the stop) is always there to see.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_vllm import SimProcess

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ("--fault", "error_503=0.15", "--fault", "rate_limit=0.05", "--retry-after", "0.1")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _build_cmd(sim: SimProcess, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dreamgen", "build", "--server", sim.url, "--model", sim.model,
        "--count", "1000", "--concurrency", "4", "--out", str(out), "--seed", "0", *extra,
    ]  # fmt: skip


def _fields(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split()[2:])


@pytest.fixture
def sim() -> SimProcess:
    with SimProcess("--profile", "8b", *FAULTS) as sp:
        yield sp


def test_log_lines_when_stderr_is_not_a_terminal(sim: SimProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _build_cmd(sim, out, "--progress-interval", "0.3"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # stop once records flow and faults were served
        line = proc.stderr.readline()
        lines.append(line)
        if " progress " in line:
            f = _fields(line)
            if int(f["total"]) >= 3 and int(f["server_errors"]) >= 1:
                break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines += err.splitlines()
    assert proc.returncode == 130, err
    progress = [_fields(x) for x in lines if " progress " in x]
    assert len(progress) >= 4
    assert set(progress[0]) == {
        "state", "total", "target", "rejected", "retries", "server_errors", "in_flight",
        "limit", "tok_s", "elapsed_s", "eta_s",
    }  # fmt: skip
    # Lines come every 0.3 s, not only when a record lands; the clock only goes forward.
    elapsed = [float(p["elapsed_s"]) for p in progress]
    assert elapsed == sorted(elapsed)
    running = [p for p in progress if p["state"] == "running" and int(p["total"]) > 0]
    assert running and all(p["eta_s"] != "none" and float(p["eta_s"]) > 0 for p in running)
    draining = [p for p in progress if p["state"] == "draining"]
    assert draining, "the drain after SIGINT was not shown"
    assert all(int(p["in_flight"]) > 0 for p in draining)
    last = progress[-1]
    assert last["state"] == "done" and last["in_flight"] == "0"
    assert float(last["elapsed_s"]) > float(draining[0]["elapsed_s"])  # timer ran through it
    # The counts are the server's own: every 503/429 the sim served, every retry made.
    stats = sim.stats()["faults"]
    assert int(last["server_errors"]) == stats["error_503"] + stats["rate_limit"] > 0
    assert 0 < int(last["retries"]) <= int(last["server_errors"])
    # What the last line reports is what is on disk (no minimal pairs in this config).
    on_disk = sum(len(f.read_bytes().splitlines()) for f in (out / "shards").glob("*.jsonl"))
    assert int(last["total"]) == on_disk > 0


def test_live_bar_on_a_terminal(sim: SimProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
    proc = subprocess.Popen(
        _build_cmd(sim, out), cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    seen = ""
    signalled = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        text = ANSI.sub("", seen).replace("\r", "\n")
        if not signalled and re.search(r"running .* [1-9]\d*/1000", text):
            proc.send_signal(signal.SIGINT)
            signalled = True
        if proc.poll() is not None and not ready:
            break
    os.close(master)
    proc.wait(timeout=60)
    text = ANSI.sub("", seen).replace("\r", "\n")
    assert signalled and proc.returncode == 130, text[-2000:]
    for field in ("retries", "server errors", "in flight", "tok/s", "ETA"):
        assert field in text
    assert re.search(r"draining .*/1000", text), "no draining state on the bar"
    assert re.search(r"done .*/1000", text)
    assert " progress state=" not in text  # log lines are for non-terminals only
    assert "build summary" in text
