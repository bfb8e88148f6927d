from __future__ import annotations

from typing import Any

import orjson
import pytest

import dreamgen
from dreamgen import filters
from dreamgen.cards import CardSet
from dreamgen.config import PlanConfig
from dreamgen.planner import Planner
from dreamgen.record import Record
from dreamgen.request import Request
from dreamgen.scenario import Scenario
from dreamgen.stages import REASONS
from dreamgen.validate import Rejected, label


@pytest.fixture
def request_(cards: CardSet) -> Request:
    return Planner(cards, PlanConfig(seed=3), target=10).next()


def raw(scenario: Scenario, **changes: Any) -> bytes:
    data = scenario.model_dump(mode="json")
    data.update(changes)
    return orjson.dumps(data)


def reason_of(payload: Any, request: Request | None, **kw: Any) -> str:
    with pytest.raises(Rejected) as info:
        dreamgen.validate(payload, request, **kw)
    assert info.value.reason in REASONS
    assert info.value.message
    return info.value.reason


def assert_exact(record: Record) -> None:
    for sp in record.cues + record.distractors:
        assert record.content_of(sp.message)[sp.start : sp.end] == sp.text


def test_good_scenario_becomes_a_labelled_record(scenario: Scenario, request_: Request) -> None:
    record = dreamgen.validate(raw(scenario), request_, model="m", engine="e")
    assert_exact(record)
    assert record.messages[-1].role == "user"
    assert record.cues[0].message == len(record.messages) - 1
    assert record.cues[0].text == scenario.decision_turn.cue.strip()
    assert record.distractors[0].text == scenario.idea_turn.idea.strip()
    assert record.axes == request_.axes
    assert record.group_id == record.id
    assert record.provenance.prompt_hash == request_.prompt_hash
    # Round trip through the public API as an existing record.
    assert dreamgen.validate(record.model_dump(mode="json")) == record


def test_segments_are_joined_with_spaces_and_offsets_stay_exact(
    scenario: Scenario, request_: Request
) -> None:
    turn = {
        "before": "Fine,",
        "cue": "  use the csv module ",
        "after": "please.",
        "kind": "constraint",
    }
    record = dreamgen.validate(raw(scenario, decision_turn=turn), request_)
    assert record.messages[-1].content == "Fine,  use the csv module please."
    assert record.cues[0].text == "use the csv module"
    assert_exact(record)


def test_extra_quotes_are_found_with_drift(scenario: Scenario, request_: Request) -> None:
    data = scenario.model_dump(mode="json")
    data["opening"] = "Keep it  on the \u201cCSV\u201d module, please. Keep it tidy."
    data["extra_cues"] = [{"turn": 0, "quote": 'keep it on the "csv" module', "kind": "constraint"}]
    data["extra_distractors"] = [{"turn": -1, "quote": data["reflex"][:20], "kind": "better_tool"}]
    record = dreamgen.validate(orjson.dumps(data), request_)
    assert record.cues[1].text == "Keep it  on the \u201cCSV\u201d module"
    assert record.distractors[1].message == record.contrast_index
    assert_exact(record)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "schema"),
        (b'{"opening": "hi"}', "schema"),
    ],
)
def test_malformed_output_is_rejected_with_a_name(
    payload: bytes, reason: str, request_: Request
) -> None:
    assert reason_of(payload, request_) == reason


def test_truncated_is_never_parsed(scenario: Scenario, request_: Request) -> None:
    assert reason_of(raw(scenario), request_, finish_reason="length") == "truncated"


def test_named_rejections(scenario: Scenario, request_: Request) -> None:
    blank = {"before": "x", "cue": "   ", "after": "", "kind": "constraint"}
    assert reason_of(raw(scenario, decision_turn=blank), request_) == "empty_cue"
    missing = [{"turn": 0, "quote": "words that never occur", "kind": "constraint"}]
    assert reason_of(raw(scenario, extra_cues=missing), request_) == "cue_not_found"
    wrong_turn = [{"turn": 1, "quote": "x", "kind": "constraint"}]  # turn 1 is an assistant turn
    assert reason_of(raw(scenario, extra_cues=wrong_turn), request_) == "bad_turn_index"
    gone = [{"turn": -1, "quote": "not in the reflex", "kind": "tangent"}]
    assert reason_of(raw(scenario, extra_distractors=gone), request_) == "distractor_not_found"
    same = raw(scenario, reflex=scenario.listening)
    assert reason_of(same, request_) == "identical_responses"


def test_directed_scenario_without_request_is_a_clear_rejection(scenario: Scenario) -> None:
    assert reason_of(raw(scenario), None) == "schema"


def test_undirected_scenario_labels_itself(scenario: Scenario) -> None:
    data = scenario.model_dump(mode="json") | {
        "domain": "operations",
        "emotion": "tired",
        "momentum": "debugging",
        "difficulty": 4,
    }
    record = dreamgen.validate(orjson.dumps(data))
    assert record.axes.domain == "operations"
    assert record.axes.cue_kind == scenario.decision_turn.kind
    assert record.difficulty == 4


def test_record_invariants(scenario: Scenario, request_: Request) -> None:
    good = label(scenario, request_).model_dump(mode="json")
    bad = orjson.loads(orjson.dumps(good))
    bad["cues"][0]["start"] += 1
    assert reason_of(bad, None) == "schema"
    bad = orjson.loads(orjson.dumps(good))
    bad["cues"][0]["message"] = len(bad["messages"]) - 2  # an assistant turn
    assert reason_of(bad, None) == "schema"
    bad = orjson.loads(orjson.dumps(good))
    bad["messages"] = bad["messages"][:-1]  # the last turn is no longer the user's
    assert reason_of(bad, None) == "schema"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("listening", "As an AI, I will do what you say.", "boilerplate"),
        ("listening", "Ok.", "too_short"),
        ("listening", "Instead, let's switch everything to pandas first.", "listening_pushes_idea"),
    ],
)
def test_rule_filters(
    scenario: Scenario, request_: Request, field: str, value: str, reason: str
) -> None:
    # model_copy skips the schema's own minimum lengths: the filter must hold on its own.
    record = label(scenario.model_copy(update={field: value}), request_)
    with pytest.raises(Rejected) as info:
        filters.check(record)
    assert info.value.reason == reason


def test_listening_that_restates_the_idea_is_rejected(
    scenario: Scenario, request_: Request
) -> None:
    idea = scenario.idea_turn.idea
    record = dreamgen.validate(raw(scenario, listening=idea + " Then the fix."), request_)
    with pytest.raises(Rejected, match="listening_pushes_idea"):
        filters.check(record)


def test_shipped_examples_pass_the_filters(cards: CardSet, request_: Request) -> None:
    for example in cards.examples:
        filters.check(label(example, request_))
