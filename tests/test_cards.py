"""Seed cards: the shipped library, `dreamgen cards check` on broken cards, the sandbox."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError
from typer.testing import CliRunner

from dreamgen import filters
from dreamgen.cards import PROMPTS_DIR, CardError, CardSet, describe_value, lint, make_env
from dreamgen.cli import app
from dreamgen.scenario import Scenario, UndirectedScenario
from dreamgen.taxonomy import all_values
from dreamgen.validate import label

runner = CliRunner()


# -- the shipped library ----------------------------------------------------------------


def test_shipped_library_is_clean() -> None:
    assert lint() == []
    result = runner.invoke(app, ["cards", "check"])
    assert result.exit_code == 0, result.output
    assert "cards OK" in result.output


def test_library_covers_the_taxonomy(cards: CardSet) -> None:
    values = all_values()
    assert len(cards.cards) >= 16
    for axis, field in [
        ("cue_kind", "cue_kinds"),
        ("distractor_kind", "distractor_kinds"),
        ("emotion", "emotions"),
        ("momentum", "momentum"),
        ("stakes", "stakes_allowed"),
    ]:
        covered = {v for c in cards.cards for v in getattr(c, field)}
        assert covered == set(values[axis]), axis
    domains = {d for c in cards.cards for d in c.domains}
    assert len(domains) >= 6
    # No card is a catch-all: each one sets up a situation with its own allowed values.
    for card in cards.cards:
        assert len(card.cue_kinds) < len(values["cue_kind"]), card.id
        assert len(card.distractor_kinds) < len(values["distractor_kind"]), card.id
    # Domain spread: every domain has at least two cards.
    per_domain = Counter(d for c in cards.cards for d in c.domains)
    assert min(per_domain.values()) >= 2, per_domain


def test_worked_examples_are_valid_and_varied(cards: CardSet) -> None:
    for card in cards.cards:
        assert card.examples, f"{card.id} has no worked example"
        for ex in card.examples:
            Scenario.model_validate(ex.model_dump())
            # An example shows the card's own kinds.
            assert ex.decision_turn.kind in card.cue_kinds, card.id
            assert ex.idea_turn.kind in card.distractor_kinds, card.id
            # It labels cleanly and passes every rule filter (no echo, no boilerplate).
            record = label(
                UndirectedScenario(
                    **ex.model_dump(),
                    domain=card.domains[0],
                    emotion=card.emotions[0],
                    momentum=card.momentum[0],
                    difficulty=card.difficulty[0],
                )
            )
            filters.check(record)
            assert record.cues[0].text in record.messages[-1].content
    kinds = {ex.decision_turn.kind for ex in cards.examples}
    ideas = {ex.idea_turn.kind for ex in cards.examples}
    assert kinds == set(all_values()["cue_kind"])
    assert ideas == set(all_values()["distractor_kind"])
    # The rotation of examples shows many topics, so no single one anchors the model.
    assert len({ex.opening for ex in cards.examples}) == len(cards.examples)


def test_cards_list_and_show() -> None:
    result = runner.invoke(app, ["cards", "list"])
    assert result.exit_code == 0
    assert "airflow" in result.output and "weeknight" in result.output
    result = runner.invoke(app, ["cards", "show", "flapping-alert"])
    assert result.exit_code == 0
    assert "Silence it until Monday" in result.output
    result = runner.invoke(app, ["cards", "show", "no-such-card"])
    assert result.exit_code != 0


# -- broken cards ------------------------------------------------------------------------

GOOD = (PROMPTS_DIR / "essay-trim.yaml").read_text(encoding="utf-8")


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    """A prompts folder with one good card and the shipped templates."""
    root = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR / "templates", root / "templates")
    (root / "good.yaml").write_text(GOOD, encoding="utf-8")
    assert lint(root) == []
    return root


def check(root: Path) -> list[str]:
    result = runner.invoke(app, ["cards", "check", "--prompts", str(root)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == lint(root)
    return lines


def test_yaml_error_names_file_and_line(prompts: Path) -> None:
    bad = prompts / "bad.yaml"
    bad.write_text("id: bad\ntitle: Bad\nsituation: [unclosed\n  and more: x\n")
    (line,) = check(prompts)
    assert line.startswith(f"{bad}:")
    assert "YAML error" in line
    assert int(line.split(":")[1]) in (3, 4)


def test_unknown_taxonomy_value(prompts: Path) -> None:
    bad = prompts / "bad.yaml"
    text = GOOD.replace("id: essay-trim", "id: bad").replace(
        "distractor_kinds: [unsolicited_refactor", "distractor_kinds: [feature_creep"
    )
    bad.write_text(text)
    (line,) = check(prompts)
    n = next(i for i, t in enumerate(text.splitlines(), 1) if "feature_creep" in t)
    assert line.startswith(f"{bad}:{n}: distractor_kinds.0: unknown taxonomy value 'feature_creep'")
    assert "scope_creep" in line  # the allowed values are listed


def test_unknown_value_inside_an_example(prompts: Path) -> None:
    text = GOOD.replace("id: essay-trim", "id: bad").replace("kind: scope_limit", "kind: vibes")
    (prompts / "bad.yaml").write_text(text)
    (line,) = check(prompts)
    assert "examples.0.decision_turn.kind: unknown taxonomy value 'vibes'" in line


def test_template_syntax_error(prompts: Path) -> None:
    path = prompts / "templates" / "directed.j2"
    path.write_text(path.read_text() + "{% if axes %}\nnever closed\n")
    (line,) = check(prompts)
    assert line.startswith(f"{path}:")
    assert "template syntax error" in line


def test_undeclared_template_variable(prompts: Path) -> None:
    path = prompts / "templates" / "directed.j2"
    path.write_text(path.read_text() + "Tone: {{ tone }}\n")
    (line,) = check(prompts)
    n = len(path.read_text().splitlines())
    assert line == f"{path}:{n}: uses variable 'tone' that nothing supplies"


def test_variable_from_another_template_is_not_supplied(prompts: Path) -> None:
    # `parent` exists for evolve.j2, but a directed card's template never receives it.
    path = prompts / "templates" / "directed.j2"
    path.write_text(path.read_text() + "{{ parent }}\n")
    (line,) = check(prompts)
    assert "uses variable 'parent' that nothing supplies" in line


def test_misspelt_attribute_fails_the_trial_render(prompts: Path) -> None:
    path = prompts / "templates" / "directed.j2"
    path.write_text(path.read_text() + "{{ card.situaton }}\n")
    (line,) = check(prompts)
    assert "fails to render card 'essay-trim'" in line and "situaton" in line


def test_duplicate_id(prompts: Path) -> None:
    (prompts / "zz-copy.yaml").write_text(GOOD)
    (line,) = check(prompts)
    assert line == (
        f"{prompts / 'zz-copy.yaml'}: duplicate card id 'essay-trim' "
        f"(also in {prompts / 'good.yaml'})"
    )


def test_every_problem_is_one_line(prompts: Path) -> None:
    (prompts / "a.yaml").write_text("id: [\n")
    (prompts / "b.yaml").write_text(GOOD)
    (prompts / "c.yaml").write_text(
        GOOD.replace("id: essay-trim", "id: c").replace(
            "domains: [writing_editing]", "domains: [knitting]"
        )
    )
    (prompts / "templates" / "extra.j2").write_text("{{ nope }} {% for %}")
    lines = check(prompts)
    assert len(lines) == 4
    with pytest.raises(CardError) as info:
        CardSet.load(prompts)
    assert str(info.value).splitlines() == lines


# -- cards added to the library ---------------------------------------------------------


def test_extra_folders_add_cards_to_the_shipped_library(tmp_path: Path, cards: CardSet) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    mine_card = GOOD.replace("id: essay-trim", "id: my-essay-trim")
    (mine / "good.yaml").write_text(mine_card, encoding="utf-8")
    both = CardSet.load(PROMPTS_DIR, [mine])
    assert [c.id for c in both.cards] == [*(c.id for c in cards.cards), "my-essay-trim"]
    assert both.root == PROMPTS_DIR and both.fingerprint != cards.fingerprint
    (mine / "good.yaml").write_text(mine_card.replace("Trim", "Shorten"), encoding="utf-8")
    assert CardSet.load(PROMPTS_DIR, [mine]).fingerprint != both.fingerprint  # edits count
    listed = runner.invoke(app, ["cards", "list", "--cards", str(mine)])
    assert listed.exit_code == 0 and "my-essay-trim" in listed.output, listed.output
    checked = runner.invoke(app, ["cards", "check", "--cards", str(mine)])
    assert checked.exit_code == 0, checked.output
    assert f"{len(cards.cards) + 1} cards OK" in checked.output
    from dreamgen.config import Config
    from dreamgen.pipeline import Run

    run = Run(Config(extra_cards=[mine], out=tmp_path / "out", count=1))
    assert "my-essay-trim" in run.cards.by_id


def test_an_added_card_may_not_reuse_an_id(tmp_path: Path, cards: CardSet) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    taken = cards.cards[0].id
    (mine / "again.yaml").write_text(GOOD.replace("id: essay-trim", f"id: {taken}"))
    (line,) = lint(PROMPTS_DIR, [mine])
    assert f"duplicate card id {taken!r}" in line and str(mine / "again.yaml") in line
    with pytest.raises(CardError, match="duplicate card id"):
        CardSet.load(PROMPTS_DIR, [mine])


def test_a_missing_card_folder_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["cards", "check", "--cards", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.strip() == f"{tmp_path / 'nope'}: no such folder of cards"


def test_missing_template(prompts: Path) -> None:
    (prompts / "templates" / "undirected.j2").unlink()
    (line,) = check(prompts)
    assert "undirected.j2: template missing" in line


# -- the sandbox -------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ card.__class__.__init__.__globals__ }}",
    "{{ describe.__globals__['__builtins__'] }}",
    "{{ describe.__code__ }}",
    "{{ card.model_config.__class__ }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_refuses_attribute_escapes(cards: CardSet, source: str) -> None:
    env = make_env(PROMPTS_DIR / "templates")
    with pytest.raises(SecurityError):
        env.from_string(source).render(card=cards.cards[0], describe=describe_value)


def test_sandbox_applies_to_card_templates(prompts: Path) -> None:
    path = prompts / "templates" / "directed.j2"
    path.write_text("{{ ''.__class__.__mro__ }}\n")
    # `cards check` renders every card once, so the escape is caught before any run...
    (line,) = check(prompts)
    assert line.startswith(f"{path}: fails to render card 'essay-trim'") and "not allowed" in line
    # ...and a card set that skipped the check still renders in the sandbox.
    cs = CardSet([], prompts)
    with pytest.raises(CardError, match="not allowed"):
        cs.render("directed.j2")


def test_sandbox_is_immutable(cards: CardSet) -> None:
    env = make_env(PROMPTS_DIR / "templates")
    with pytest.raises(SecurityError):
        env.from_string("{{ items.append(1) }}").render(items=[])


def test_strict_undefined() -> None:
    from jinja2.exceptions import UndefinedError

    env = make_env(PROMPTS_DIR / "templates")
    with pytest.raises(UndefinedError):
        env.from_string("{{ missing }}").render()
