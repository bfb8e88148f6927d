"""The dream loop: minimal pairs, the echo filters, and an end-to-end build on the real
embedded model with evolution, undirected dreaming and minimal pairs on."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from dreamgen import filters, pairs
from dreamgen.cards import CardSet
from dreamgen.config import Config, PlanConfig, SamplingConfig
from dreamgen.pipeline import Run
from dreamgen.reader import read as read_records
from dreamgen.record import Record
from dreamgen.scenario import Scenario, UndirectedScenario
from dreamgen.validate import Rejected, label


def record_of(scenario: Scenario, **extra: object) -> Record:
    data = scenario.model_dump() | extra
    return label(
        UndirectedScenario(
            **data, domain="data_engineering", emotion="tired", momentum="executing", difficulty=2
        )
    )


@pytest.fixture
def parent(scenario: Scenario) -> Record:
    return record_of(scenario)


# -- minimal pairs -----------------------------------------------------------------------


def test_pairs_share_the_group_and_keep_labels_exact(parent: Record) -> None:
    removed, contradicted = pairs.derive(parent)
    for variant in (removed, contradicted):
        Record.model_validate(variant.model_dump())  # every span exact, invariants hold
        assert variant.mode == "minimal_pair"
        assert variant.group_id == parent.group_id and variant.parent_id == parent.id
        assert variant.split == parent.split and variant.generation == parent.generation
        assert variant.id != parent.id
        assert variant.quality.pair_of == parent.id
        # Everything before the decision turn is untouched, token for token.
        assert variant.messages[:-1] == parent.messages[:-1]
        assert [d for d in variant.distractors if d.message < len(variant.messages)] == [
            d for d in parent.distractors if d.message < len(parent.messages)
        ]
    assert removed.minimal_pair == "cue_removed"
    assert contradicted.minimal_pair == "cue_contradicted"


def test_cue_removed(parent: Record) -> None:
    (removed,) = pairs.derive(parent, ["cue_removed"])
    cue = parent.cues[0]
    assert removed.cues == []
    decision = removed.messages[-1].content
    assert cue.text not in decision
    # The rest of the turn stays (a dangling connective at the cut aside).
    original = parent.messages[-1].content
    after = original[cue.end :].strip()
    assert decision.endswith(after) if after else True
    assert removed.target == parent.target and removed.contrast == parent.contrast
    assert removed.quality.target_follows == "removed_direction"


def test_cue_contradicted(parent: Record) -> None:
    (flip,) = pairs.derive(parent, ["cue_contradicted"])
    (cue,) = flip.cues
    assert cue.text in pairs.CONTRADICTIONS
    assert flip.messages[-1].content[cue.start : cue.end] == cue.text
    assert cue.kind == "explicit_instruction" == flip.axes.cue_kind
    # The direction now points at the idea: the old reflex is the target.
    assert flip.target == parent.contrast and flip.contrast == parent.target
    assert flip.quality.replaced_cue == parent.cues[0].text
    # The idea span is still labelled where it was.
    assert flip.distractors[0] == parent.distractors[0]


def test_pairs_of_a_mid_sentence_cue(scenario: Scenario) -> None:
    scenario.decision_turn.before = "We talked it over and "
    scenario.decision_turn.cue = "we keep the csv module"
    scenario.decision_turn.after = ", so what's the fix?"
    rec = record_of(scenario)
    removed, flip = pairs.derive(rec)
    assert removed.messages[-1].content == "We talked it over. So what's the fix?"
    text = flip.messages[-1].content
    assert text.startswith("We talked it over. ") and text.endswith(" So what's the fix?")


def test_pairs_with_an_extra_cue_in_an_earlier_turn(scenario: Scenario) -> None:
    quote = scenario.opening.split()[1]
    rec = record_of(scenario, extra_cues=[{"turn": 0, "quote": quote, "kind": "constraint"}])
    assert len(rec.cues) == 2
    removed, flip = pairs.derive(rec)
    assert removed.cues == [] and quote not in removed.messages[0].content.split()
    assert len(flip.cues) == 1 and flip.cues[0].message == len(flip.messages) - 1


def test_a_turn_that_is_only_the_cue_has_no_removed_variant(scenario: Scenario) -> None:
    scenario.decision_turn.before = ""
    scenario.decision_turn.after = ""
    variants = pairs.derive(record_of(scenario))
    assert [v.minimal_pair for v in variants] == ["cue_contradicted"]


def test_pairs_are_not_derived_from_pairs(parent: Record) -> None:
    for variant in pairs.derive(parent):
        assert pairs.derive(variant) == []
        assert not pairs.selected(variant, 1.0)


def test_selection_is_stable_by_record_id(cards: CardSet) -> None:
    records = [
        record_of(ex.model_copy(update={"opening": f"{ex.opening} #{i}"}))
        for i in range(10)
        for ex in cards.examples
    ]
    picked = [r.id for r in records if pairs.selected(r, 0.3)]
    assert picked == [r.id for r in records if pairs.selected(r, 0.3)]
    assert 0.15 < len(picked) / len(records) < 0.45
    assert not any(pairs.selected(r, 0.0) for r in records)
    assert all(pairs.selected(r, 1.0) for r in records)


def test_only_a_cue_removed_pair_may_have_no_cue(parent: Record) -> None:
    data = parent.model_dump() | {"cues": []}
    with pytest.raises(ValidationError, match="at least one cue"):
        Record.model_validate(data)
    with pytest.raises(ValidationError, match="at least one cue"):
        Record.model_validate(data | {"mode": "minimal_pair", "minimal_pair": "cue_contradicted"})
    Record.model_validate(data | {"mode": "minimal_pair", "minimal_pair": "cue_removed"})


# -- echo and placeholder filters ---------------------------------------------------------


@pytest.mark.parametrize(
    ("opening", "reason"),
    [
        ("The user's first message", "echoed_prompt"),
        ("Situation", "echoed_prompt"),
        ("Topic:", "echoed_prompt"),
        ("I think we have a scope_creep problem here.", "echoed_prompt"),
        (
            "The assistant wants to switch to a tool or library it thinks is better.",
            "echoed_prompt",
        ),
        ("The user is worn out and wants it finished, help me.", "echoed_prompt"),
        ("<the user's opening message>", "placeholder"),
        ("Hi, I need help with [insert topic here].", "placeholder"),
        ("Hello {{ name }}", "placeholder"),
        ("...", "placeholder"),
    ],
)
def test_echo_and_placeholder_are_rejected(scenario: Scenario, opening: str, reason: str) -> None:
    rec = record_of(scenario.model_copy(update={"opening": opening}))
    with pytest.raises(Rejected) as info:
        filters.check(rec)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "opening",
    [
        "My Rust function returns Option<Box<dyn Fn>> and I can't call it.",
        "The <div class='hero'> overflows on mobile.",
        "We're at a decision point on the migration; I'd like to keep Postgres.",
        "Can you list the steps? I'm tired and want it finished tonight.",
    ],
)
def test_real_content_passes_the_echo_filter(scenario: Scenario, opening: str) -> None:
    filters.check(record_of(scenario.model_copy(update={"opening": opening})))


def test_a_repeated_turn_is_rejected(scenario: Scenario) -> None:
    rec = record_of(scenario.model_copy(update={"listening": scenario.opening}))
    with pytest.raises(Rejected) as info:
        filters.check(rec)
    assert info.value.reason == "repeated_turn"


# -- end to end on the embedded model ------------------------------------------------------


def test_dream_loop_end_to_end_on_the_embedded_model(tmp_path: Path) -> None:
    """Real SmolLM2 through ``Run``: directed, evolved and undirected records with minimal
    pairs, lineage intact.

    Two runs on one OUT: the first (target 1, no room for an undirected record) accepts a
    directed record; the second (target 3) resumes, so its directed request is guaranteed
    to be an evolution of a stored parent (``evolve_share=1``), and it fills the undirected
    bucket (round(3 * 0.34) = 1). Lineage must survive the restart; pairs count toward no
    target.
    """
    plan = PlanConfig(
        seed=3,
        difficulty_min=1,
        difficulty_max=2,
        evolve_share=1.0,
        undirected_share=0.34,
        minimal_pairs=1.0,
    )

    def config(count: int) -> Config:
        return Config(
            engine="embedded",
            out=tmp_path / "out",
            count=count,
            embedded_parallel=1,
            plan=plan,
            sampling=SamplingConfig(seed=1),
        )

    first = asyncio.run(Run(config(1)).run())
    assert first.accepted == 1
    second = asyncio.run(Run(config(3)).run())
    assert second.accepted == 2 and second.resumed >= 1

    records = list(read_records(tmp_path / "out"))
    by_id = {r.id: r for r in records}
    scenarios = [r for r in records if r.mode != "minimal_pair"]
    modes = Counter(r.mode for r in scenarios)
    assert len(scenarios) == 3
    assert modes == {"directed": 1, "evolved": 1, "undirected": 1}
    for r in scenarios:
        if r.mode == "evolved":
            parent = by_id[r.parent_id]
            assert parent.mode != "minimal_pair"
            assert r.group_id == parent.group_id
            assert r.generation == parent.generation + 1
            assert r.provenance.operator is not None
        else:
            assert not r.parent_id and r.group_id == r.id and r.generation == 0
        if r.mode == "undirected":
            assert r.provenance.card == "undirected"
        else:
            assert r.provenance.card in CardSet.load().by_id
    minimal = [r for r in records if r.mode == "minimal_pair"]
    assert minimal, "minimal_pairs=1.0 derives pairs from every accepted record"
    assert first.minimal_pairs + second.minimal_pairs == len(minimal)
    for pair in minimal:
        source = by_id[pair.parent_id]
        assert pair.group_id == source.group_id and pair.split == source.split
        assert pair.minimal_pair in ("cue_removed", "cue_contradicted")
