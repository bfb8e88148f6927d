"""Seed cards: YAML files in ``prompts/`` that set up a situation, and the Jinja2 templates
that turn a card plus chosen axes into a chat prompt.

Templates render in a sandboxed environment with strict undefined variables: a card is
data a user can edit, and a typo must fail loudly rather than render as an empty string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import jinja2
import orjson
import yaml
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamgen.scenario import Scenario
from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

# The variables every template may use; `cards check` flags anything else.
TEMPLATE_VARIABLES = {
    "card",
    "axes",
    "describe",
    "difficulty",
    "difficulty_text",
    "parent",
    "operator",
    "example",
    "schema_hint",
    "minimal_pair",
}


class CardError(Exception):
    """A seed card or template is broken; the message names the file and the problem."""


class Card(BaseModel):
    """A seed card: one situation, the taxonomy values it allows, optional examples."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    title: str
    situation: Annotated[str, Field(min_length=10)]
    domains: list[Domain] = list(Domain)
    cue_kinds: list[CueKind] = list(CueKind)
    distractor_kinds: list[DistractorKind] = list(DistractorKind)
    emotions: list[Emotion] = list(Emotion)
    momentum: list[Momentum] = list(Momentum)
    difficulty: list[Annotated[int, Field(ge=1, le=5)]] = [1, 2, 3, 4, 5]
    examples: list[Scenario] = []
    template: str = "directed.j2"


class CardSet:
    """All cards in a prompts folder, with their template environment."""

    def __init__(self, cards: list[Card], root: Path) -> None:
        self.cards = cards
        self.root = root
        self.by_id = {c.id: c for c in cards}
        self.env = make_env(root / "templates")

    @classmethod
    def load(cls, root: Path = PROMPTS_DIR) -> CardSet:
        """Load and lint every card; raises CardError listing every problem found."""
        cards, problems = _load_cards(root)
        problems += _lint_templates(root, cards)
        if problems:
            raise CardError("\n".join(problems))
        if not cards:
            raise CardError(f"{root}: no seed cards (*.yaml) found")
        return cls(cards, root)

    @cached_property
    def examples(self) -> list[Scenario]:
        """Every card's examples: the rotating pool of worked examples for the system prompt."""
        return [ex for card in self.cards for ex in card.examples]

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every card and template, so a run can tell when its prompts changed."""
        h = hashlib.sha256()
        for path in sorted(self.root.rglob("*")):
            if path.suffix in (".yaml", ".yml", ".j2"):
                h.update(path.relative_to(self.root).as_posix().encode())
                h.update(path.read_bytes())
        return h.hexdigest()[:16]

    def render(self, template: str, **context: Any) -> str:
        """Render a template with the standard helpers available."""
        return self.env.get_template(template).render(describe=describe_value, **context)


def describe_value(value: object) -> str:
    from dreamgen.taxonomy import describe

    return describe(str(value))


def make_env(templates: Path) -> ImmutableSandboxedEnvironment:
    """A sandboxed Jinja2 environment that refuses undefined variables."""
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _load_cards(root: Path) -> tuple[list[Card], list[str]]:
    cards: list[Card] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f":{mark.line + 1}" if mark is not None else ""
            problems.append(f"{path}{where}: YAML error: {exc.problem or exc}")
            continue
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
            continue
        if not isinstance(data, dict):
            problems.append(f"{path}: a card must be a YAML mapping")
            continue
        try:
            card = Card.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(f"{path}: {loc}: {err['msg']}")
            continue
        if card.id in seen:
            problems.append(f"{path}: duplicate card id {card.id!r} (also in {seen[card.id]})")
            continue
        seen[card.id] = path
        cards.append(card)
    return cards, problems


def _lint_templates(root: Path, cards: Iterable[Card]) -> list[str]:
    problems: list[str] = []
    templates = root / "templates"
    env = make_env(templates)
    needed = {c.template for c in cards} | {"system.j2", "evolve.j2", "undirected.j2"}
    names = sorted(needed | {p.name for p in templates.glob("*.j2")})
    for name in names:
        path = templates / name
        if not path.is_file():
            users = sorted(c.id for c in cards if c.template == name)
            problems.append(f"{path}: template missing (used by {', '.join(users) or 'dreamgen'})")
            continue
        source = path.read_text(encoding="utf-8")
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(f"{path}:{exc.lineno}: template syntax error: {exc.message}")
            continue
        unknown = meta.find_undeclared_variables(ast) - TEMPLATE_VARIABLES
        for var in sorted(unknown):
            problems.append(f"{path}: uses variable {var!r} that nothing supplies")
    return problems


def lint(root: Path = PROMPTS_DIR) -> list[str]:
    """Every problem with the cards and templates under ``root``, one line each."""
    cards, problems = _load_cards(root)
    return problems + _lint_templates(root, cards)


def example_json(example: Scenario) -> str:
    """A worked example as compact JSON, as the model should write it."""
    return orjson.dumps(example.model_dump(mode="json")).decode()
