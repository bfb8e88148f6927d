"""`dreamgen label` with the rules labeller: spans, formats, bad lines, resume, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli import dreamgen as cli

from dreamgen.label_out import LABELLED, REJECTED, STATE, LabelOutput
from dreamgen.label_run import LabelJob, LabelRun
from dreamgen.labelled import Labelled, read_labelled
from dreamgen.labeller import point_at, rules_labels
from dreamgen.store import StoreError

ROOT = Path(__file__).resolve().parent.parent


def chat(*turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def label(tmp_path: Path, rows: list[Any], **job: Any) -> list[Labelled]:
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    asyncio.run(LabelRun(LabelJob(src, out, "rules", **job)).run())
    return list(read_labelled(out / LABELLED))  # validates every span against its text


def test_rules_find_cues_and_ideas() -> None:
    messages = chat(
        "The parser is slow.",
        "It works. It might be worth switching to TOML instead.",
        "No, keep the old parser. We decided on YAML last week. Thanks.",
    )
    labels = rules_labels(point_at(messages, 2, limit=None))
    user, assistant = messages[2]["content"], messages[1]["content"]
    assert [(user[s.start : s.end], s.kind) for s in labels.cues] == [
        ("No, keep the old parser.", "correction"),
        ("We decided on YAML last week.", "prior_decision"),
    ]
    assert [(assistant[s.start : s.end], s.kind) for s in labels.distractors] == [
        ("It might be worth switching to TOML instead.", "better_tool")
    ]
    assert not rules_labels(point_at(chat("Hi.", "Done.", "Thanks, that works."), 2, None)).cues


def test_repeated_phrases_and_astral_characters_before_the_cue(tmp_path: Path) -> None:
    user = "𝔸😀 the tests pass. 😀 the tests pass. Only touch the parser. 😀 the tests pass."
    (item,) = label(tmp_path, [{"messages": chat("Go.", "Done; the tests pass.", user)}])
    (cue,) = item.cues
    # Offsets in code points: "𝔸😀" + " the tests pass. " is 19, "😀 the tests pass. " 18.
    assert (cue.start, cue.end) == (37, 59)
    assert user[37:59] == "Only touch the parser."
    assert cue.kind == "scope_limit" and not item.no_direction


def test_a_one_megabyte_turn(tmp_path: Path) -> None:
    prefix = "𝔸 the log says ok and the run went well here. " * 21_000
    user = prefix + "Don't change the schema."
    assert len(user.encode()) > 1_000_000
    (item,) = label(tmp_path, [{"messages": chat("Look.", "It looks fine.", user)}])
    assert [(c.start, c.end, c.text) for c in item.cues] == [
        (len(prefix), len(user), "Don't change the schema.")
    ]


def test_all_turns_share_a_group(tmp_path: Path) -> None:
    messages = chat("Fix it.", "Fixed.", "Only the tests now.", "Done; I could add CI too.", "Ok.")
    items = label(tmp_path, [{"messages": messages}], all_turns=True)
    assert [len(i.messages) for i in items] == [3, 5]
    assert len({i.group_id for i in items}) == 1 and len({i.id for i in items}) == 2
    assert [i.provenance.turn for i in items if i.provenance] == [2, 4]
    assert items[0].cues[0].text == "Only the tests now."
    assert items[1].no_direction  # "Ok." gives no direction


def test_labels_on_the_input_are_ignored(tmp_path: Path) -> None:
    gold = next(read_labelled(ROOT / "tests" / "data" / "dev.jsonl"))
    (item,) = label(tmp_path, [orjson.loads(gold.model_dump_json())])
    assert item.messages == gold.messages
    assert item.provenance is not None and item.provenance.labeller == "rules"


def test_bad_lines_are_named_and_the_rest_is_labelled(tmp_path: Path) -> None:
    good = orjson.dumps({"messages": chat("Go.", "Ok.", "Just the first part.")})
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([good, b"", b"{oops", orjson.dumps({"messages": chat("Hi")}), good]))
    out = tmp_path / "out"
    result = cli("label", str(src), "--out", str(out), "--engine", "rules")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {src}:2: empty line (skipped)", errors[1]]
    assert errors[1].startswith(f"error: {src}:3: not JSON")
    assert "Traceback" not in result.stderr
    assert len(list(read_labelled(out / LABELLED))) == 2
    rejected = [orjson.loads(line) for line in (out / REJECTED).read_bytes().splitlines()]
    assert [(r["input_index"], r["reason"]) for r in rejected] == [
        (1, "malformed_input"),
        (2, "malformed_input"),
        (3, "no_decision_point"),
    ]
    again = cli("label", str(src), "--out", str(out), "--engine", "rules")
    assert again.returncode == 1 and "error: " not in again.stderr  # done: nothing re-read
    assert len(list(read_labelled(out / LABELLED))) == 2


def test_a_different_run_on_the_same_out_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": chat("a", "b", "Only c.")}])
    out = tmp_path / "out"
    assert cli("label", str(src), "--out", str(out), "--engine", "rules").returncode == 0
    result = cli("label", str(src), "--out", str(out), "--engine", "rules", "--all-turns")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "all_turns" in result.stderr
    missing = cli("label", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_lines_past_the_checkpoint_are_rolled_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = {"k": 1}
    store = LabelOutput(out, run)
    store.finish(0, [b'{"a":1}'], [])
    store.flush()
    store.close()
    with open(out / LABELLED, "ab") as f:  # a batch killed before its checkpoint, torn
        f.write(b'{"a":2}\n{"a"')
    store = LabelOutput(out, run)
    assert store.is_done(0) and not store.is_done(1)
    store.close()
    assert (out / LABELLED).read_bytes() == b'{"a":1}\n'
    with pytest.raises(StoreError, match="another run"):
        LabelOutput(out, {"k": 2})
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / LABELLED).write_bytes(b'{"mine": 1}\n')
    with pytest.raises(StoreError, match="no state.json"):
        LabelOutput(tmp_path / "theirs", run)
    assert (tmp_path / "theirs" / LABELLED).read_bytes() == b'{"mine": 1}\n'  # untouched


def test_resume_after_sigkill_labels_every_item_exactly_once(tmp_path: Path) -> None:
    n = 40_000
    rows = [
        {"messages": chat(f"Task {i}.", "We could also add a cache.", f"Only step {i}, please.")}
        for i in range(n)
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dreamgen", "label", str(src), "--out", str(out)]
    proc = subprocess.Popen([*args, "--engine", "rules"], cwd=ROOT, stderr=subprocess.DEVNULL)
    state = out / STATE
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and done < 2000:
        time.sleep(0.05)
        if state.exists():
            done = orjson.loads(state.read_bytes())["done_below"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = orjson.loads(state.read_bytes())["done_below"]
    assert 0 < at_kill < n, "the kill must land mid-run"
    result = cli("label", str(src), "--out", str(out), "--engine", "rules")
    assert result.returncode == 0, result.stderr
    seen = Counter(item.provenance.input_index for item in read_labelled(out / LABELLED))
    assert len(seen) == n and set(seen.values()) == {1}
    final = orjson.loads(state.read_bytes())
    assert final["done_below"] == n and final["totals"]["labelled"] == n
