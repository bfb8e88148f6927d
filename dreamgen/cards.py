"""Seed cards: YAML files in ``prompts/`` that set up a situation, and the Jinja2 templates
that turn a card plus chosen axes into a chat prompt.

Templates render in ``dreamgen.sandbox`` (plain data only, bounded work, strict undefined
variables): a card is data a user can share and edit, never code, and a typo must fail
loudly rather than render as an empty string. YAML is read with limits on its size, its
node count (aliases expanded) and its nesting, so a card cannot be a memory bomb.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import jinja2
import orjson
import yaml
from jinja2 import meta
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamgen.sandbox import CardSandbox, one_line
from dreamgen.sandbox import render as render_template
from dreamgen.scenario import Scenario
from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum, Stakes

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"

# What the planner supplies to each template (``describe`` is always there); a card's own
# template gets what a directed request has. `cards check` flags anything else.
DIRECTED_VARIABLES = frozenset({"card", "axes", "difficulty", "difficulty_text"})
TEMPLATE_CONTEXTS: dict[str, frozenset[str]] = {
    "system.j2": frozenset({"example"}),
    "evolve.j2": frozenset({"parent", "operator", "axes", "difficulty", "difficulty_text"}),
    "undirected.j2": frozenset(),
}
TEMPLATE_VARIABLES = frozenset({"describe"}).union(DIRECTED_VARIABLES, *TEMPLATE_CONTEXTS.values())

# A card is a page of YAML: far below these. Above them it is a mistake or an attack.
MAX_CARD_BYTES = 256 * 1024
MAX_CARD_NODES = 20_000  # scalars, lists and mappings, every alias counted as a copy
MAX_CARD_DEPTH = 32
EXCERPT = 80  # characters of an offending value quoted in an error


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
    template: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+\.j2$")] = "directed.j2"
    # Direction vs correctness: per stakes value the card allows beyond "none", the concrete
    # mistake or risk the user's direction carries in this situation (shown in the prompt).
    stakes: dict[Stakes, Annotated[str, Field(min_length=10)]] = {}

    @property
    def stakes_allowed(self) -> list[str]:
        """The stakes values a request from this card may ask for ("none" always)."""
        return [Stakes.none.value, *(str(s) for s in self.stakes if s != Stakes.none)]


class CardSet:
    """All cards in a prompts folder, with their template environment."""

    def __init__(self, cards: list[Card], root: Path, extra: Sequence[Path] = ()) -> None:
        self.cards = cards
        self.root = root
        self.extra = list(extra)  # folders of more cards; templates come from ``root`` only
        self.by_id = {c.id: c for c in cards}
        self.env = make_env(root / "templates")
        self._systems: dict[str, str] = {}  # system_prompt's renders, by example id
        # Compile now what was just linted, so later edits on disk cannot reach this set.
        for name in sorted({c.template for c in cards} | set(TEMPLATE_CONTEXTS)):
            if cards and (root / "templates" / name).is_file():
                try:
                    self.env.get_template(name)
                except jinja2.TemplateError as exc:
                    raise CardError(f"{root / 'templates' / name}: {one_line(exc)}") from exc

    @classmethod
    def load(cls, root: Path = PROMPTS_DIR, extra: Sequence[Path] = ()) -> CardSet:
        """Load and lint every card under ``root`` and each ``extra`` folder (cards only:
        they add to the library, e.g. the shipped one); raises CardError listing every
        problem found. A card id may appear once across all folders."""
        cards, problems = _load_cards([root, *extra])
        problems += _lint_templates(root, cards)
        if problems:
            raise CardError("\n".join(problems))
        if not cards:
            raise CardError(f"{root}: no seed cards (*.yaml) found")
        return cls(cards, root, extra)

    @cached_property
    def examples(self) -> list[Scenario]:
        """Every card's examples: the rotating pool of worked examples for the system prompt."""
        return [ex for card in self.cards for ex in card.examples]

    @cached_property
    def examples_by_id(self) -> dict[str, Scenario]:
        """The same pool keyed ``CARD#INDEX``, in the same order: a request names the one
        it showed (``Request.example``)."""
        return {f"{c.id}#{i}": ex for c in self.cards for i, ex in enumerate(c.examples)}

    @cached_property
    def example_ids(self) -> list[str]:
        """``examples_by_id``'s keys, in order: the rotation of the system prompt's example."""
        return list(self.examples_by_id)

    def system_prompt(self, example_id: str) -> str:
        """The system prompt showing worked example ``example_id`` ("": none). Rendered once
        per example: every request that shows it gets the same bytes (vLLM's prefix cache
        relies on that), so a render per request would only cost time."""
        hit = self._systems.get(example_id)
        if hit is None:
            shown = example_json(self.examples_by_id[example_id]) if example_id else "(none)"
            hit = self._systems[example_id] = self.render("system.j2", example=shown)
        return hit

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every card and template, so a run can tell when its prompts changed."""
        h = hashlib.sha256()
        for path in sorted(self.root.rglob("*")):
            if path.suffix in (".yaml", ".yml", ".j2"):
                h.update(path.relative_to(self.root).as_posix().encode())
                h.update(path.read_bytes())
        for i, folder in enumerate(self.extra):  # added cards, by position and name
            for path in _card_files(folder):
                h.update(f"+{i}/{path.name}".encode())
                h.update(path.read_bytes())
        return h.hexdigest()[:16]

    def render(self, template: str, **context: Any) -> str:
        """Render a template in the sandbox; models in ``context`` are passed as plain data.

        Raises CardError (one line) if the template is refused or fails.
        """
        try:
            return render_template(self.env, template, context)
        except jinja2.TemplateError as exc:
            raise CardError(f"{self.root / 'templates' / template}: {one_line(exc)}") from exc


def describe_value(value: object) -> str:
    """``describe(axes.domain)`` in a template: the taxonomy's description of a value."""
    from dreamgen.taxonomy import describe

    return describe(str(value))[:1000]


def make_env(templates: Path) -> CardSandbox:
    """The card sandbox over ``templates``, with ``describe`` as its one helper."""
    return CardSandbox(templates, {"describe": describe_value})


def _excerpt(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else repr(value[: EXCERPT + 1])
    return text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"


def _count_nodes(root: yaml.Node) -> str | None:
    """Why a composed document is too big (aliases expanded), or None. Stops at the limit."""
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_CARD_NODES:
            return f"more than {MAX_CARD_NODES} YAML nodes (aliases count once per use)"
        if depth > MAX_CARD_DEPTH:
            return f"nested deeper than {MAX_CARD_DEPTH} levels"
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
    return None


def load_card_yaml(path: Path) -> Any:
    """Parse one card file within the limits; raises CardError with file, line and why."""
    try:
        size = path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise CardError(f"{path}: {size} bytes, over the card limit of {MAX_CARD_BYTES}")
        with path.open("rb") as f:
            raw = f.read(MAX_CARD_BYTES + 1)
    except OSError as exc:
        raise CardError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CardError(f"{path}: not UTF-8 (byte {exc.start})") from exc
    loader = yaml.CSafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if (why := _count_nodes(node)) is not None:
            raise CardError(f"{path}: {why}")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}" if mark is not None else ""
        raise CardError(f"{path}{where}: YAML error: {one_line(exc.problem or exc)}") from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise CardError(f"{path}: cannot read: {one_line(exc)}") from exc
    finally:
        loader.dispose()


def _card_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))


def _load_cards(roots: Sequence[Path]) -> tuple[list[Card], list[str]]:
    cards: list[Card] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    missing = [f"{r}: no such folder of cards" for r in roots if not r.is_dir()]
    if missing:
        return [], missing
    for path in [p for root in roots for p in _card_files(root)]:
        try:
            data = load_card_yaml(path)
        except CardError as exc:
            problems.append(str(exc))
            continue
        if not isinstance(data, dict):
            problems.append(f"{path}: a card must be a YAML mapping")
            continue
        try:
            card = Card.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                problems.append(_card_problem(path, err))
            continue
        if card.id in seen:
            problems.append(f"{path}: duplicate card id {card.id!r} (also in {seen[card.id]})")
            continue
        seen[card.id] = path
        cards.append(card)
    return cards, problems


def _card_problem(path: Path, err: Any) -> str:
    """One line for a card validation error, with the YAML line where the value sits."""
    loc = [p for p in err["loc"] if not isinstance(p, str) or p not in ("str", "int")]
    where = _yaml_line(path, loc)
    field = ".".join(str(p) for p in loc) or "(card)"
    if err["type"] == "enum":
        allowed = err.get("ctx", {}).get("expected", "")
        msg = f"unknown taxonomy value {_excerpt(err['input'])} (allowed: {allowed})"
    elif err["type"] == "extra_forbidden":
        msg = f"unknown field (allowed: {', '.join(Card.model_fields)})"
    else:
        msg = one_line(err["msg"])
    return f"{path}{where}: {field[:120]}: {msg}"


def _yaml_line(path: Path, loc: list[Any]) -> str:
    """``:LINE`` of the YAML node at ``loc`` (or its deepest existing parent), else ""."""
    try:  # the file already passed load_card_yaml's limits
        node: Any = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
    except (yaml.YAMLError, OSError, UnicodeDecodeError, RecursionError):
        return ""
    mark = node.start_mark if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            hit = node.value[key] if 0 <= key < len(node.value) else None
        else:
            hit = None
        if hit is None:
            break
        node, mark = hit, hit.start_mark
    return f":{mark.line + 1}" if mark is not None else ""


def _context_for(name: str, cards: Iterable[Card]) -> frozenset[str]:
    supplied = frozenset({"describe"})
    if name in TEMPLATE_CONTEXTS:
        return supplied | TEMPLATE_CONTEXTS[name]
    if any(c.template == name for c in cards):
        return supplied | DIRECTED_VARIABLES
    return TEMPLATE_VARIABLES  # a template nothing uses yet: anything the planner has


def _lint_templates(root: Path, cards: Iterable[Card]) -> list[str]:
    problems: list[str] = []
    cards = list(cards)
    templates = root / "templates"
    env = make_env(templates)
    needed = {c.template for c in cards} | set(TEMPLATE_CONTEXTS)
    names = sorted(needed | {p.name for p in templates.glob("*.j2")})
    clean: set[str] = set()
    for name in names:
        path = templates / name
        if not path.is_file():
            users = sorted(c.id for c in cards if c.template == name)
            problems.append(f"{path}: template missing (used by {', '.join(users) or 'dreamgen'})")
            continue
        try:  # through the sandbox's loader: its size and encoding limits apply
            source = env.loader_source(name)
            ast = env.parse(source, name, str(path))
            unknown = meta.find_undeclared_variables(ast) - _context_for(name, cards)
        except jinja2.TemplateSyntaxError as exc:  # TemplateAssertionError: an unknown filter
            problems.append(f"{path}:{exc.lineno}: template syntax error: {one_line(exc.message)}")
            continue
        except jinja2.TemplateError as exc:
            problems.append(one_line(exc))
            continue
        except RecursionError:  # ((((… thousands deep: the parser's own recursion
            problems.append(f"{path}: template nests too deep to parse")
            continue
        for var in sorted(unknown):
            line = next((i for i, text in enumerate(source.splitlines(), 1) if var in text), None)
            where = f":{line}" if line else ""
            problems.append(f"{path}{where}: uses variable {var!r} that nothing supplies")
        if not unknown:
            clean.add(name)
    # Render every card once: a misspelt attribute ({{ card.situaton }}) only shows there.
    # A template refused for one card is reported once, not once per card that uses it.
    for card in cards:
        if card.template in clean:
            failed = _try_render(env, templates / card.template, card)
            problems += failed
            if failed:
                clean.discard(card.template)
    return problems


def _try_render(env: CardSandbox, path: Path, card: Card) -> list[str]:
    from dreamgen.record import Axes
    from dreamgen.taxonomy import DIFFICULTY

    axes = Axes(
        cue_kind=card.cue_kinds[0],
        distractor_kind=card.distractor_kinds[0],
        domain=card.domains[0],
        emotion=card.emotions[0],
        momentum=card.momentum[0],
    )
    d = card.difficulty[0]
    try:
        # Once per stakes value the card allows: the stakes branch renders only then.
        for stakes in card.stakes_allowed:
            axes.stakes = Stakes(stakes)
            context = {"card": card, "axes": axes, "difficulty": d}
            render_template(env, path.name, {**context, "difficulty_text": DIFFICULTY[d]})
    except jinja2.TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f":{line}" if line else ""
        return [f"{path}{where}: fails to render card {card.id!r}: {one_line(exc)}"]
    return []


def lint(root: Path = PROMPTS_DIR, extra: Sequence[Path] = ()) -> list[str]:
    """Every problem with the cards and templates under ``root`` (and the cards of each
    ``extra`` folder), one line each."""
    cards, problems = _load_cards([root, *extra])
    return problems + _lint_templates(root, cards)


def example_json(example: Scenario) -> str:
    """A worked example as compact JSON, as the model should write it."""
    return orjson.dumps(example.model_dump(mode="json")).decode()
