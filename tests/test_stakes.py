"""Direction vs correctness: the `stakes` axis, its quota, the cards and prompts that carry
it, and old records that predate it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from dreamgen.cards import CardSet, lint
from dreamgen.cli import app, coverage_table
from dreamgen.config import PlanConfig
from dreamgen.planner import STAKES, Planner
from dreamgen.record import Record
from dreamgen.taxonomy import DESCRIPTIONS, Stakes, all_values
from tests.conftest import make_record
from tests.test_planner import simulate

ROOT = Path(__file__).resolve().parent.parent


def test_axis_values_and_descriptions() -> None:
    assert all_values()["stakes"] == ["none", "user_mistaken", "risky"]
    for value in Stakes:
        assert DESCRIPTIONS[value]
    # What the listening reply does in those scenarios is said in the prompt text itself.
    for value in STAKES:
        assert "names the" in DESCRIPTIONS[value] and "overrides" in DESCRIPTIONS[value]


def test_a_record_written_before_the_axis_reads_as_none() -> None:
    record = make_record(
        [("user", "Only fix the typo, please.")],
        "Fixed it.",
        "Let me rewrite the whole paragraph.",
        [(0, "Only fix the typo")],
    )
    data = orjson.loads(record.model_dump_json())
    del data["axes"]["stakes"]
    old = Record.model_validate(data)
    assert old.axes.stakes == "none"
    risky = make_record(
        [("user", "Delete the logs now.")],
        "Deleting the rotated logs.",
        "Let me ship them somewhere first.",
        [(0, "Delete the logs now")],
        axes={"stakes": "risky"},
    )
    assert Record.model_validate_json(risky.model_dump_json()).axes.stakes == "risky"


def test_stakes_share_is_met_by_cards_that_allow_it(cards: CardSet) -> None:
    config = PlanConfig(seed=5, stakes_share=0.2)
    planner, issued, accepted = simulate(cards, config, 100, accept=0.6, outcome_seed=2)
    assert planner.stakes_quota() == {"user_mistaken": 10, "risky": 10}
    got = Counter(r.axes.stakes for r in accepted)
    assert abs(got["user_mistaken"] - 10) <= 1 and abs(got["risky"] - 10) <= 1, got
    for request in issued:
        assert request.axes is not None
        card = cards.by_id[request.card]
        assert request.axes.stakes in card.stakes_allowed
        prompt = request.messages[1]["content"]
        if request.axes.stakes == "none":
            assert "A problem in the direction" not in prompt
        else:
            # The card's concrete note is what the model is asked to build the scenario on.
            note = " ".join(card.stakes[Stakes(request.axes.stakes)].split())
            assert note in " ".join(prompt.split())
    assert all(v == 0 for v in planner.stakes_inflight.values())
    rows = {r["cue_kind"]: r for r in planner.coverage()}
    assert rows["(stakes risky)"]["filled"] == got["risky"]
    assert rows["(stakes risky)"]["quota"] == 10


def test_share_zero_asks_for_none(cards: CardSet) -> None:
    planner = Planner(cards, PlanConfig(stakes_share=0.0), 50)
    assert all(planner.next().axes.stakes == "none" for _ in range(200))  # type: ignore[union-attr]
    assert not any(str(r["cue_kind"]).startswith("(stakes") for r in planner.coverage())


def test_evolution_keeps_the_parents_stakes(cards: CardSet) -> None:
    config = PlanConfig(seed=1, stakes_share=0.5, evolve_share=0.8)
    _, issued, _ = simulate(cards, config, 60, accept=0.9)
    evolved = [r for r in issued if r.mode == "evolved"]
    assert evolved
    for request in evolved:
        assert request.axes is not None
        if request.axes.stakes != "none":
            assert "Keep the problem in the direction" in request.messages[1]["content"]


def test_labelled_records_carry_the_requested_stakes(cards: CardSet) -> None:
    _, _, accepted = simulate(cards, PlanConfig(seed=2, stakes_share=0.5), 20, accept=1.0)
    assert {r.axes.stakes for r in accepted} >= {"none", "user_mistaken", "risky"}


def test_coverage_command_shows_stakes_rows(tmp_path: Path, cards: CardSet) -> None:
    planner = Planner(cards, PlanConfig(), 40)
    (tmp_path / "manifest.json").write_bytes(orjson.dumps({"coverage": planner.coverage()}))
    result = CliRunner().invoke(app, ["coverage", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "(stakes user_mistaken)" in result.output and "(stakes risky)" in result.output
    assert coverage_table(planner.coverage()).row_count == len(planner.coverage())


@pytest.mark.parametrize(
    ("stakes", "problem"),
    [
        ('{maybe: "a note that is long enough"}', "unknown taxonomy value 'maybe'"),
        ("{risky: short}", "String should have at least 10 characters"),
    ],
)
def test_bad_stakes_in_a_card_is_one_line(tmp_path: Path, stakes: str, problem: str) -> None:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "templates").symlink_to(ROOT / "dreamgen" / "prompts" / "templates")
    card = (ROOT / "dreamgen" / "prompts" / "essay-trim.yaml").read_text(encoding="utf-8")
    (prompts / "essay-trim.yaml").write_text(f"{card}\nstakes: {stakes}\n", encoding="utf-8")
    problems = lint(prompts)
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert "essay-trim.yaml" in problems[0] and problem in problems[0], problems
