"""`dreamgen preview`: a few scenarios printed with their spans marked; nothing written.

Runs the real CLI as a subprocess against the simulated vLLM server (tests/fake_vllm.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fake_vllm import SimProcess

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"\[(cue|distractor):([a-z_]+)\](.+?)\[/\1\]")


def test_preview_prints_marked_scenarios_and_writes_nothing(tmp_path: Path) -> None:
    with SimProcess("--profile", "stress") as sim:
        res = subprocess.run(
            [sys.executable, "-m", "dreamgen", "preview", "--count", "3", "--server", sim.url,
             "--model", sim.model, "--seed", "1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "COLUMNS": "10000"},
        )  # fmt: skip
        served = sim.stats()["requests_received"]
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout
    headers = [x for x in text.splitlines() if x.startswith("── ")]
    assert len(headers) == 3, text[-3000:]
    assert "3 of 3 scenarios shown" in text and "nothing was written" in text
    assert list(tmp_path.iterdir()) == []  # no output folder, no store, no dedup index
    assert served >= 3
    # Every printed scenario marks at least one cue, in a user turn, and every mark wraps
    # a non-empty quote of the line it is on.
    blocks = text.split("── ")[1:]
    for block in blocks:
        user_lines = [x for x in block.splitlines() if x.startswith("user: ")]
        cues = [m for line in user_lines for m in MARK.finditer(line) if m.group(1) == "cue"]
        assert cues, block
        for line in block.splitlines():
            for m in MARK.finditer(line):
                assert m.group(3).strip()


def test_preview_unknown_card_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "dreamgen", "preview", "--card", "nope", "--server",
         "http://127.0.0.1:9", "--model", "m"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no card 'nope'"), res.stderr
