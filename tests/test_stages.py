"""The stage chain: each stage owns its reasons; the chain stops at the first rejection."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dreamgen import evolution, filters, fingerprint, stages
from dreamgen.cards import CardSet
from dreamgen.config import Config, CopyConfig, PlanConfig
from dreamgen.copies import CopyIndex
from dreamgen.dedup import Dedup
from dreamgen.planner import Planner
from dreamgen.scenario import Scenario
from dreamgen.store import Store


def test_every_reason_belongs_to_one_stage() -> None:
    values = list(stages.REASONS)
    assert len(values) == len(set(values))
    assert "engine_error" in values and "near_duplicate" in values and "schema" in values
    assert "surplus" not in values  # dropped beyond the target, never counted


@pytest.fixture
def chain(tmp_path: Path) -> stages.Chain:
    store = Store(tmp_path / "out", config={}, fingerprint="t")
    index = Dedup(tmp_path / "dedup")
    return stages.chain_for(
        splits=Config().splits,
        index=index,
        store=store,
        full=lambda _: False,
        copy_index=CopyIndex(CardSet.load(), CopyConfig()),
        timed=True,
    )


def _item(cards: CardSet, content: str) -> stages.Item:
    request = Planner(cards, PlanConfig(), None).next()
    return stages.Item(request, content)


def test_a_good_answer_passes_every_stage_and_a_repeat_is_a_duplicate(
    chain: stages.Chain, cards: CardSet, scenario: Scenario
) -> None:
    raw = orjson.dumps(scenario.model_dump(mode="json")).decode()
    first = _item(cards, raw)
    assert chain.process(first).kept
    assert first.record is not None and first.signature is not None
    again = chain.process(_item(cards, raw))
    assert again.reason == "duplicate" and not again.kept
    assert [t.n for t in chain.times.values()] == [2, 2, 2, 2, 2, 1, 1]
    assert chain.times["dedup"].rejected == 1


def test_rejections_carry_the_owning_stage_reason(chain: stages.Chain, cards: CardSet) -> None:
    outcome = chain.process(_item(cards, "{not json"))
    assert outcome.reason is stages.ValidateReason.invalid_json
    assert chain.times["label"].rejected == 1 and chain.times["filter"].n == 0
    truncated = stages.Item(_item(cards, "{}").request, "{}", finish_reason="length")
    assert chain.process(truncated).reason is stages.ValidateReason.truncated


def test_the_echo_filter_covers_every_snake_case_taxonomy_value() -> None:
    from dreamgen.taxonomy import all_values

    for values in all_values().values():
        for value in values:
            if "_" in value:
                assert filters.ECHO.search(f"we picked {value} here"), value


def test_prompt_fingerprint_covers_prompt_text_held_in_code(
    cards: CardSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = fingerprint.prompt_fingerprint(cards)
    monkeypatch.setitem(fingerprint.DESCRIPTIONS, "tangent", "a different description")
    assert fingerprint.prompt_fingerprint(cards) != before
    monkeypatch.undo()
    monkeypatch.setitem(evolution.OPERATORS, "subtler_cue", "changed")
    assert fingerprint.prompt_fingerprint(cards) != before


# Texts each rule pattern matches (one per alternative), and near misses.
_PATTERN_SAMPLES = [
    "as an ai, i", "as a language model", "i'm just an ai", "im just an ai", "i cannot assist",
    "i can't assist", "i'm sorry, but i", "<the user's first message>", "[insert name here]",
    "[your project]", "{{ card }}", "}}", "lorem ipsum", "the user's first message",
    "the assistant's next reply", "decision turn", "decision_turn", "idea_turn", "idea turn",
    "extra_cues", "listening reply", "reflex response", "field guide", "format example",
    "scope_creep", "prior_decision", "as a", "assistant", "the users", "decision", "<b>", "[x]",
    "sorry, but", "a language", "lorem", "field", "user_", "_",
]  # fmt: skip


@given(
    before=st.text(alphabet="abc _<[{}'.,\n", max_size=30),
    sample=st.sampled_from(_PATTERN_SAMPLES),
    after=st.text(alphabet="abc _>]}'.,\n", max_size=30),
)
def test_the_rule_filters_skip_a_regex_only_when_it_cannot_match(
    before: str, sample: str, after: str
) -> None:
    """The substring prefilter in front of each pattern never hides a match."""
    text = (before + sample + after).lower()
    for pattern, needles in (
        (filters.BOILERPLATE, filters.BOILERPLATE_NEEDLES),
        (filters.PLACEHOLDER, filters.PLACEHOLDER_NEEDLES),
        (filters.ECHO, filters.ECHO_NEEDLES),
    ):
        expected = pattern.search(text)
        got = filters._search(pattern, needles, text)
        assert (got and got.group(0)) == (expected and expected.group(0))
