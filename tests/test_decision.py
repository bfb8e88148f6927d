"""Decision-point inputs: both formats read, every position grouped, disjointness checked."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

pytest.importorskip("transformers")

import conftest

from dreamgen.decision import (
    GROUPS,
    Conversation,
    ConversationError,
    SpanRef,
    decision_inputs,
    is_labelled_file,
    overlap,
    read_conversations,
)
from dreamgen.training import load_tokenizer

DEV = Path(__file__).parent / "data" / "dev.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def record_file(path: Path) -> Path:
    record = conftest.make_record(
        [("assistant", "We could port this to Go."), ("user", "No. Only fix the typo.")],
        "Fixing the typo only.",
        "Porting to Go first.",
        [(1, "Only fix the typo")],
        [(0, "port this to Go")],
        rid="rec-1",
    )
    path.write_bytes(orjson.dumps(record.model_dump(mode="json")) + b"\n")
    return path


def test_reads_labelled_and_record_files(tmp_path):
    dev = read_conversations(DEV)
    assert len(dev) == 41 and is_labelled_file(DEV)
    assert dev[0].id == "dev-001" and dev[0].group_id == "dev-group-001"
    assert dev[0].responses  # listening/reflex are kept for the overlap check
    records = read_conversations(record_file(tmp_path / "r.jsonl"))
    assert [c.id for c in records] == ["rec-1"] and not is_labelled_file(tmp_path / "r.jsonl")
    assert records[0].distractors[0].text == "port this to Go"


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConversationError, match="no such file"):
        read_conversations(tmp_path / "missing.jsonl")
    line = orjson.loads(DEV.read_bytes().splitlines()[0])
    line["cues"][0]["start"] += 1  # text no longer at its offsets
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(DEV.read_bytes().splitlines()[1] + b"\n" + orjson.dumps(line) + b"\n")
    with pytest.raises(ConversationError) as err:
        read_conversations(bad)
    assert f"{bad}:2: cues.0.text" in str(err.value) and "\n" not in str(err.value)


def runs(tokenizer, inputs, group: str) -> list[str]:
    """The decoded text of each contiguous run of positions in ``group``."""
    out: list[list[int]] = []
    last = -2
    for i, g in enumerate(inputs.groups):
        if g == GROUPS.index(group):
            if i != last + 1:
                out.append([])
            out[-1].append(inputs.input_ids[i])
            last = i
    return [tokenizer.decode(ids) for ids in out]


def test_groups_cover_the_prompt_and_hit_the_spans(tokenizer):
    for conv in read_conversations(DEV):
        inputs = decision_inputs(conv, tokenizer, sink_tokens=4)
        assert len(inputs.groups) == len(inputs.input_ids)
        assert inputs.groups[:4] == [GROUPS.index("sink")] * 4
        assert sum(inputs.count(g) for g in GROUPS) == len(inputs.input_ids)
        # the decision query is template markup after the last user message
        assert inputs.groups[-1] == GROUPS.index("rest")
        for spans, group in ((conv.cues, "cue"), (conv.distractors, "distractor")):
            decoded = runs(tokenizer, inputs, group)
            for span in spans:
                assert any(span.text in run for run in decoded), (conv.id, span.text, decoded)
            # controls: the rest of the spans' messages, and nothing outside them
            messages = [conv.messages[m][1] for m in {s.message for s in spans}]
            for run in runs(tokenizer, inputs, f"{group}_control"):
                assert any(run.strip() in m for m in messages), (conv.id, run)


def test_repeated_phrase_marks_only_the_labelled_occurrence(tokenizer):
    text = "keep it short. Then, please, keep it short in the summary too."
    second = text.index("keep it short", 1)
    conv = Conversation(
        id="x",
        group_id="x",
        messages=(("assistant", "Shall I add a glossary?"), ("user", text)),
        cues=(SpanRef(1, second, second + 13, "keep it short"),),
        distractors=(SpanRef(0, 0, 23, "Shall I add a glossary?"),),
    )
    inputs = decision_inputs(conv, tokenizer)
    cue_tokens = [i for i, g in enumerate(inputs.groups) if g == GROUPS.index("cue")]
    control = [i for i, g in enumerate(inputs.groups) if g == GROUPS.index("cue_control")]
    assert tokenizer.decode([inputs.input_ids[i] for i in cue_tokens]).strip() == "keep it short"
    assert min(control) < min(cue_tokens)  # the first occurrence is control, not cue
    assert "keep it short" in tokenizer.decode([inputs.input_ids[i] for i in control])
    assert inputs.count("distractor_control") == 0  # the distractor is the whole message


def test_overlap_names_shared_groups_ids_and_texts(tmp_path):
    dev = read_conversations(DEV)
    train = read_conversations(record_file(tmp_path / "r.jsonl"))
    assert overlap(train, dev) == []
    first = dev[0]
    copied = Conversation(
        id="new-id",
        group_id="new-group",
        messages=first.messages,
        cues=first.cues,
        distractors=first.distractors,
    )
    problems = overlap([copied], dev)
    assert len(problems) == 1 and problems[0].startswith("dev-001: text")
    same_group = Conversation(
        id="other", group_id=first.group_id, messages=(("user", "hi"),), cues=(), distractors=()
    )
    assert overlap([same_group], dev) == [
        f"dev-001: group {first.group_id!r} is in the training data"
    ]
    # a shared generic system prompt is not content
    system_only = Conversation(
        id="s", group_id="s", messages=(first.messages[0], ("user", "unrelated")), cues=(),
        distractors=(),
    )  # fmt: skip
    assert first.messages[0][0] == "system" and overlap([system_only], dev) == []
