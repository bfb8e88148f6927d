"""label-eval: metrics checked against numbers worked out by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from dreamgen.label_eval import evaluate, headline
from dreamgen.labelled import Labelled

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "tests" / "data" / "dev.jsonl"

A_USER = "Only fix the bug. Thanks."
A_ASSISTANT = "We could also add tests."
B_USER = "Thanks, that works."


def conv(
    user: str,
    cues: list[tuple[int, int, str]],
    distractors: list[tuple[int, int, str]] = (),  # type: ignore[assignment]
    assistant: str = A_ASSISTANT,
) -> Labelled:
    msgs = [("user", "Fix it."), ("assistant", assistant), ("user", user)]
    data: dict[str, Any] = {
        "messages": [{"role": r, "content": c} for r, c in msgs],
        "cues": [
            {"message": 2, "start": s, "end": e, "kind": k, "text": user[s:e]} for s, e, k in cues
        ],
        "distractors": [
            {"message": 1, "start": s, "end": e, "kind": k, "text": assistant[s:e]}
            for s, e, k in distractors
        ],
        "no_direction": not cues,
    }
    return Labelled.model_validate(data)


def test_numbers_worked_out_by_hand() -> None:
    gold = [
        conv(A_USER, [(0, 16, "scope_limit")], [(0, 23, "scope_creep")]),
        conv(B_USER, []),
        conv("Go on.", [(0, 5, "explicit_instruction")]),  # never predicted: missing
    ]
    pred = [
        conv(A_USER, [(0, 17, "explicit_instruction")], [(14, 23, "scope_creep")]),
        conv(B_USER, [(0, 6, "preference")]),
        conv("Something else.", []),  # not in gold: unmatched
    ]
    r = evaluate(pred, gold)
    # Characters: predicted 17 + 6 + 9 = 32, gold 16 + 23 = 39, overlapping 16 + 9 = 25.
    assert r["span_f1"] == pytest.approx(round(2 * 25 / (32 + 39), 4))
    assert r["overall"]["span"]["precision"] == pytest.approx(round(25 / 32, 4))
    assert r["cues"]["span"]["recall"] == 1.0
    # Exact (trimmed): "Only fix the bug." == "Only fix the bug"; 1 of 3 predicted, 1 of 2 gold.
    assert r["exact_segment"] == pytest.approx(0.4)
    # Overlapped gold spans: the cue (wrong kind) and the distractor (right kind).
    assert r["kind_accuracy"] == 0.5
    assert r["no_direction_accuracy"] == 0.5
    assert (r["n"], r["missing"], r["unmatched"]) == (2, 1, 1)
    assert r["per_cue_kind"]["scope_limit"]["exact"] == 1
    assert r["per_cue_kind"]["scope_limit"]["right_kind"] == 0
    assert headline(r) == (
        "span_f1=0.7042 exact_segment=0.4000 kind_accuracy=0.5000 no_direction_accuracy=0.5000 n=2"
    )


def test_cli_gold_against_itself_is_perfect_and_writes_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamgen",
            "label-eval",
            str(DEV),
            str(DEV),
            "--json",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == (
        "span_f1=1.0000 exact_segment=1.0000 kind_accuracy=1.0000 no_direction_accuracy=1.0000 n=41"
    )
    data = orjson.loads((tmp_path / "e.json").read_bytes())
    assert data["n"] == 41 and data["per_cue_kind"]["implicit_context"]["gold"] == 10


def test_cli_bad_gold_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    result = subprocess.run(
        [sys.executable, "-m", "dreamgen", "label-eval", str(DEV), str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and f"{bad}:1" in result.stderr
    assert "Traceback" not in result.stderr
