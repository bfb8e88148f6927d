"""The labelled-conversation contract, its reader, and the hand-written dev set."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from dreamgen.labelled import (
    SCHEMA_PATH,
    Labelled,
    LabelledError,
    iter_labelled,
    read_labelled,
    render_schema,
    write_schema,
)
from dreamgen.taxonomy import CueKind, DistractorKind, Domain

DEV = Path(__file__).parent / "data" / "dev.jsonl"


@pytest.fixture(scope="module")
def dev() -> list[Labelled]:
    return list(read_labelled(DEV))


def _spans(item: Labelled) -> list[Any]:
    return [*item.cues, *item.distractors]


# ------------------------------------------------------------------ the dev set


def test_dev_set_parses(dev: list[Labelled]) -> None:
    assert len(dev) >= 36
    ids = [item.id for item in dev]
    groups = [item.group_id for item in dev]
    assert len(set(ids)) == len(ids)
    assert len(set(groups)) == len(groups)
    for item in dev:
        assert item.id and item.id.startswith("dev-")
        assert item.source == "hand-written"
        assert item.listening and item.reflex
        assert item.decision.role == "user"
        before = item.messages[1:-1] if item.messages[0].role == "system" else item.messages[:-1]
        assert 2 <= len(before) <= 6, item.id
        assert item.distractors, item.id


def test_dev_set_covers_every_kind_twice(dev: list[Labelled]) -> None:
    cues = Counter(c.kind for item in dev for c in item.cues)
    distractors = Counter(d.kind for item in dev for d in item.distractors)
    for cue_kind in CueKind:
        assert cues[cue_kind] >= 2, cue_kind
    for distractor_kind in DistractorKind:
        assert distractors[distractor_kind] >= 2, distractor_kind


def test_dev_set_covers_difficulties_and_domains(dev: list[Labelled]) -> None:
    difficulty = Counter(item.difficulty for item in dev)
    for level in range(1, 6):
        assert difficulty[level] >= 4, level
    domains = Counter(item.domain for item in dev)
    assert len(domains) >= 5
    assert set(domains) <= {d.value for d in Domain}


def test_dev_set_has_no_direction_items(dev: list[Labelled]) -> None:
    undirected = [item for item in dev if item.no_direction]
    assert len(undirected) >= 3
    assert all(not item.cues for item in undirected)


def test_dev_set_has_two_cue_kinds_in_one_conversation(dev: list[Labelled]) -> None:
    assert sum(len({c.kind for c in item.cues}) >= 2 for item in dev) >= 2


def test_dev_set_has_astral_characters_before_spans(dev: list[Labelled]) -> None:
    """Offsets are code points: an emoji before a span would shift UTF-16 offsets by one."""
    hits = {
        item.id
        for item in dev
        for s in _spans(item)
        if any(ord(ch) > 0xFFFF for ch in item.messages[s.message].content[: s.start])
    }
    assert len(hits) >= 3


def test_dev_set_has_repeated_phrase_traps(dev: list[Labelled]) -> None:
    """A cue whose text occurs more than once in its turn, labelled at a later occurrence."""
    traps = {
        item.id
        for item in dev
        for c in item.cues
        if item.messages[c.message].content.find(c.text) < c.start
    }
    assert len(traps) >= 3


# ------------------------------------------------------------------ the schema


def test_checked_in_schema_matches_model() -> None:
    assert SCHEMA_PATH.read_bytes() == render_schema(), "run: python -m dreamgen.labelled"
    assert orjson.loads(SCHEMA_PATH.read_bytes()) == Labelled.model_json_schema()


def test_write_schema(tmp_path: Path) -> None:
    path = write_schema(tmp_path / "out" / "labelled.schema.json")
    assert path.read_bytes() == render_schema()


# ------------------------------------------------------------------ bad input


def _good() -> dict[str, Any]:
    return {
        "id": "t-1",
        "messages": [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": "Fix the test in test_io.py."},
            {"role": "assistant", "content": "Done. I could also port the suite to pytest."},
            {"role": "user", "content": "🚀 Thanks. Keep unittest, please."},
        ],
        "cues": [
            {"message": 3, "start": 10, "end": 23, "text": "Keep unittest", "kind": "preference"}
        ],
        "distractors": [
            {
                "message": 2,
                "start": 6,
                "end": 44,
                "text": "I could also port the suite to pytest.",
                "kind": "better_tool",
            }
        ],
        "listening": "Keeping unittest.",
        "reflex": "Here is the suite in pytest.",
        "difficulty": 2,
    }


def _write(tmp_path: Path, *rows: dict[str, Any] | str) -> Path:
    path = tmp_path / "set.jsonl"
    lines = [r if isinstance(r, str) else orjson.dumps(r).decode() for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(path: Path) -> LabelledError:
    with pytest.raises(LabelledError) as info:
        list(read_labelled(path))
    err = info.value
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}:{err.line}: ")
    return err


def test_good_line_parses_with_code_point_offsets(tmp_path: Path) -> None:
    (item,) = read_labelled(_write(tmp_path, _good()))
    cue = item.cues[0]
    assert item.messages[cue.message].content[cue.start : cue.end] == "Keep unittest"
    assert item.decision_index == 3


def test_utf16_offsets_are_rejected(tmp_path: Path) -> None:
    bad = _good()
    bad["cues"][0].update(start=11, end=24)  # what a UTF-16 count would give after 🚀
    err = _error(_write(tmp_path, _good(), bad))
    assert (err.line, err.field) == (2, "cues.0.text")


def test_text_not_at_offsets(tmp_path: Path) -> None:
    bad = _good()
    bad["cues"][0]["text"] = "Keep pytest!!"
    err = _error(_write(tmp_path, _good(), "", bad))
    assert (err.line, err.field) == (3, "cues.0.text")
    assert "'Keep pytest!!' is not the text at messages[3][10:23] ('Keep unittest')" in str(err)


def test_offsets_out_of_range(tmp_path: Path) -> None:
    bad = _good()
    bad["cues"][0].update(start=30, end=99)
    err = _error(_write(tmp_path, bad))
    assert (err.line, err.field) == (1, "cues.0.end")
    bad["cues"][0].update(start=5, end=5)
    assert _error(_write(tmp_path, bad)).field == "cues.0.end"


def test_cue_in_assistant_turn(tmp_path: Path) -> None:
    bad = _good()
    bad["cues"][0] = {**bad["distractors"][0], "kind": "preference"}
    err = _error(_write(tmp_path, bad))
    assert (err.line, err.field) == (1, "cues.0.message")
    assert "assistant message; cues sit in user messages" in str(err)


def test_distractor_in_user_turn(tmp_path: Path) -> None:
    bad = _good()
    bad["distractors"][0] = {**bad["cues"][0], "kind": "tangent"}
    err = _error(_write(tmp_path, bad))
    assert err.field == "distractors.0.message"


def test_decision_turn_not_a_user_message(tmp_path: Path) -> None:
    bad = _good()
    bad["messages"].append({"role": "assistant", "content": "Sure."})
    err = _error(_write(tmp_path, _good(), _good(), bad))
    assert (err.line, err.field) == (3, "messages.4.role")
    assert "decision turn" in str(err)


def test_not_json(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, _good(), '{"messages": [oops'))
    assert err.line == 2
    assert "not JSON" in str(err)


def test_missing_field(tmp_path: Path) -> None:
    bad = _good()
    del bad["messages"]
    err = _error(_write(tmp_path, bad))
    assert (err.line, err.field) == (1, "messages")
    assert "Field required" in str(err)


def test_bad_kind_and_extra_field(tmp_path: Path) -> None:
    bad = _good()
    bad["cues"][0]["kind"] = "vibes"
    assert _error(_write(tmp_path, bad)).field == "cues.0.kind"
    bad = _good()
    bad["split"] = "train"
    assert _error(_write(tmp_path, bad)).field == "split"


def test_no_direction_and_cues_disagree(tmp_path: Path) -> None:
    bad = _good()
    bad["no_direction"] = True
    assert _error(_write(tmp_path, bad)).field == "cues"
    bad = _good()
    bad["cues"] = []
    assert _error(_write(tmp_path, bad)).field == "cues"
    bad["no_direction"] = True
    assert len(list(read_labelled(_write(tmp_path, bad)))) == 1


def test_empty_file_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert list(read_labelled(path)) == []
    path.write_bytes(b"\n  \n\r\n")
    assert list(read_labelled(path)) == []


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LabelledError, match="cannot read"):
        list(read_labelled(tmp_path / "nope.jsonl"))


def test_skip_counts_bad_lines(tmp_path: Path) -> None:
    bad = copy.deepcopy(_good())
    bad["cues"][0]["text"] = "nope"
    path = _write(tmp_path, _good(), "not json", bad, "", _good())
    seen: list[LabelledError] = []
    good = list(iter_labelled(path, errors="skip", on_error=seen.append))
    assert len(good) == 2
    assert [(e.line, e.field) for e in seen] == [(2, ""), (3, "cues.0.text")]
    assert len(list(iter_labelled(path, errors="skip"))) == 2
