"""One line, always: every user-causable error is one `error:` line (exit 2) that touches
nothing, numbers in a config are finite and in range, and a bug is one line plus a log.

Each case is a real `dreamgen` subprocess; before issue 18 each of them printed a
traceback, accepted the value silently, or wrote OUT before failing (see the CHANGELOG).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli import dreamgen, one_error_line
from fake_vllm import SimProcess
from test_daemon import daemon, sim_config, wait_for

from dreamgen.cards import PROMPTS_DIR

ROOT = Path(__file__).resolve().parent.parent
DEAD = ["--server", "http://127.0.0.1:9/v1", "--model", "m"]  # nothing listens on port 9


CONFIGS = {
    "nan temperature": (
        "[sampling]\ntemperature = nan\n",
        "sampling.temperature: Input should be a finite number",
    ),
    "inf timeout": (
        "request_timeout_s = 1e400\n",
        "request_timeout_s: Input should be a finite number",
    ),
    "huge timeout": (
        "request_timeout_s = 1e300\n",
        "request_timeout_s: Input should be less than or equal to 604800",
    ),
    "inf backoff": ("[serving]\nrestart_backoff_max_s = inf\n", "serving.restart_backoff_max_s"),
    "nan quota": (
        '[plan]\nquotas = { "*" = nan }\n',
        "plan.quotas.*: Input should be a finite number",
    ),
    "nan split": ("[splits]\ntrain = nan\neval = 0.5\nprobe = 0.5\n", "splits.train"),
    "65-bit seed": ("[plan]\nseed = 36893488147419103232\n", "plan.seed"),
    "huge count": (
        "count = 100000000000000000000000\n",
        "count: Input should be less than or equal to",
    ),
    "nan breaker": ("[breaker]\nmin_yield = nan\n", "breaker.min_yield"),
    "difficulty upside down": (
        "[plan]\ndifficulty_min = 4\ndifficulty_max = 2\n",
        "difficulty_min 4 is above difficulty_max 2",
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bad_numbers_in_a_config_are_one_line_before_the_store(tmp_path: Path, name: str) -> None:
    text, expected = CONFIGS[name]
    config = tmp_path / "c.toml"
    config.write_text(text)
    out = tmp_path / "out"
    line = one_error_line(dreamgen("build", "--config", str(config), "--out", str(out), *DEAD))
    assert expected in line, line
    assert not out.exists()


def test_config_that_is_a_directory_or_not_utf8(tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = one_error_line(dreamgen("build", "--config", str(tmp_path), "--out", str(out)))
    assert line == f"error: {tmp_path}: is a directory, not a TOML config file"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"count = 5 # caf\xe9\n")
    line = one_error_line(dreamgen("build", "--config", str(latin1), "--out", str(out)))
    assert line == f"error: {latin1}: not UTF-8 text (byte 15)"
    assert not out.exists()


def test_bad_flags_are_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = one_error_line(dreamgen("build", "--count", "1e23", "--out", str(out)))
    assert "Invalid value for '--count'" in line and "dreamgen build --help" in line
    line = one_error_line(dreamgen("build", "--bogus"))
    assert "No such option: --bogus" in line
    line = one_error_line(dreamgen("validate"))
    assert "Missing argument" in line
    assert not out.exists()


def test_an_upside_down_difficulty_flag_leaves_the_folder_usable(tmp_path: Path) -> None:
    """Issue 18: `--difficulty 4-2` crashed after the store wrote its fingerprint, so later
    valid builds on that OUT were refused as "built with a different config"."""
    out = tmp_path / "out"
    line = one_error_line(dreamgen("build", "--difficulty", "4-2", "--out", str(out), *DEAD))
    assert "difficulty_min 4 is above difficulty_max 2" in line
    assert not out.exists()
    with SimProcess("--profile", "stress") as sim:
        args = ["--server", sim.base_url, "--model", "dreamgen-sim", "--quiet"]
        ok = dreamgen("build", "--count", "3", "--out", str(out), *args)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_corrupt_manifest_is_one_line_for_coverage(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    assert "not readable JSON" in one_error_line(dreamgen("coverage", str(tmp_path)))
    (tmp_path / "manifest.json").write_text("[1, 2, 3]")
    assert "no coverage table" in one_error_line(dreamgen("coverage", str(tmp_path)))


def test_a_bug_is_one_line_with_the_traceback_in_a_log(tmp_path: Path) -> None:
    """A command that raises what no handler maps: `error: internal: …` + the log's path."""
    script = textwrap.dedent(
        """
        import sys
        from dreamgen.cli import app, main

        @app.command("explode")
        def explode() -> None:
            print(1 / 0)

        sys.argv = ["dreamgen", "explode"]
        main()
        """
    )
    crashes = tmp_path / "crashes"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "DREAMGEN_CRASH_DIR": str(crashes)},
    )
    line = one_error_line(proc, code=1)
    assert line.startswith("error: internal: ZeroDivisionError: division by zero (traceback in ")
    (log,) = crashes.glob("crash-*.log")
    assert str(log) in line
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in explode" in text


def test_sighup_with_a_recursing_template_is_a_counted_refusal(tmp_path: Path) -> None:
    """Issue 18: the reload crashed in Daemon.reload and was not counted as refused."""
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    with SimProcess("--profile", "stress") as sim:
        config = sim_config(tmp_path, sim.base_url, prompts, count="100000")
        with daemon(tmp_path, config, tmp_path / "out") as d:
            d.wait_ready(60)
            directed = prompts / "templates" / "directed.j2"
            directed.write_text(
                "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}\n" + directed.read_text()
            )
            d.proc.send_signal(signal.SIGHUP)
            refused = wait_for(lambda: d.event("reload_refused"), 20, "refusal")[0]
            assert "nest deeper" in refused["reason"], refused
            assert d.value("dreamgen_reloads_total", result="refused") == 1
            assert d.proc.poll() is None
            now = d.value("dreamgen_store_records")
            wait_for(lambda: d.value("dreamgen_store_records") > now, 30, "still producing")
            assert d.stop() == 0
