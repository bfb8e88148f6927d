"""The planner: decides what to ask the model for next.

Closed-loop coverage: every taxonomy cell (cue kind × distractor kind × difficulty) has a
quota; the next request goes to the cell furthest below its quota, counting accepted
records and requests still in flight (a rejected request frees its slot and counts for
nothing). Within a cell the planner picks a card that allows it and spreads domains.

It also runs the dream loop (accepted scenarios evolve into subtler children that keep
their parent's group) and undirected dreaming. Every choice draws from one seeded RNG and
the counts, so a given seed and sequence of outcomes always yields the same plan.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from dreamgen.cards import Card, CardSet, example_json
from dreamgen.record import Axes, Mode, Record
from dreamgen.taxonomy import DIFFICULTY, CueKind, DistractorKind, Domain, Emotion, Momentum

Cell = tuple[str, str, int]  # (cue_kind, distractor_kind, difficulty)

OPERATORS: dict[str, str] = {
    "subtler_cue": "make the user's direction subtler: shorter, less explicit, easier to miss.",
    "stronger_distractor": "make the assistant's idea more tempting and better argued.",
    "add_emotion": "give the user a clear emotional undercurrent that adds pressure.",
    "reverse_momentum": "make the earlier conversation head the opposite way from the direction.",
    "move_domain": "move the whole situation to a different domain, keeping its shape.",
    "lengthen_context": "add an earlier exchange so the direction sits further back.",
    "change_cue_kind": "carry the direction in a different way.",
}


class PlanConfig(BaseModel):
    """What the planner aims for."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    difficulty_min: Annotated[int, Field(ge=1, le=5)] = 1
    difficulty_max: Annotated[int, Field(ge=1, le=5)] = 5
    schedule: Literal["uniform", "broad_to_subtle"] = "uniform"
    evolve_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    undirected_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_generation: Annotated[int, Field(ge=1, le=10)] = 3
    # Relative cell weights: keys "cue_kind/distractor_kind/difficulty", "*" matches any.
    quotas: dict[str, float] = {}


class Request(BaseModel):
    """One planned model call and everything needed to turn its answer into a Record."""

    model_config = ConfigDict(extra="forbid")

    index: int
    card: str
    mode: Mode
    schema_name: Literal["scenario", "scenario_undirected"]
    axes: Axes | None  # None when the model chooses (undirected)
    difficulty: int | None
    cell: Cell | None
    group_id: str | None = None
    parent_id: str | None = None
    generation: int = 0
    operator: str | None = None
    messages: list[dict[str, str]]
    prompt_hash: str


def cell_of(record: Record) -> Cell:
    return (record.axes.cue_kind, record.axes.distractor_kind, record.difficulty)


def _match(pattern: str, cell: Cell) -> bool:
    parts = pattern.split("/")
    return len(parts) == 3 and all(p in ("*", str(v)) for p, v in zip(parts, cell, strict=True))


class Planner:
    """Chooses requests toward under-filled cells; learns from accepted records only."""

    def __init__(self, cards: CardSet, config: PlanConfig, target: int | None) -> None:
        self.cards = cards
        self.config = config
        self.target = target
        self.rng = random.Random(config.seed)
        self.index = 0
        self.filled: Counter[Cell] = Counter()
        self.inflight: Counter[Cell] = Counter()
        self.domains: Counter[str] = Counter()
        self.parents: deque[Record] = deque(maxlen=2000)
        self.cells = self._cells()
        self.quota = self._quotas()

    # -- coverage ---------------------------------------------------------------------

    def _cells(self) -> list[Cell]:
        lo, hi = self.config.difficulty_min, self.config.difficulty_max
        cells = {
            (cue, dis, d)
            for card in self.cards.cards
            for cue in card.cue_kinds
            for dis in card.distractor_kinds
            for d in card.difficulty
            if lo <= d <= hi
        }
        if not cells:
            raise ValueError(f"no seed card allows difficulty {lo}..{hi}")
        return sorted(cells)

    def _weight(self, cell: Cell) -> float:
        weight = 1.0
        for pattern, w in self.config.quotas.items():
            if _match(pattern, cell):
                weight = w
        return weight

    def _quotas(self) -> dict[Cell, float]:
        weights = {c: self._weight(c) for c in self.cells}
        total = sum(weights.values())
        if self.target is None or total <= 0:
            return weights
        # Largest-remainder apportionment: integer quotas that sum exactly to the target.
        raw = {c: self.target * w / total for c, w in weights.items()}
        quota = {c: float(int(v)) for c, v in raw.items()}
        short = self.target - int(sum(quota.values()))
        for c in sorted(raw, key=lambda c: (-(raw[c] - quota[c]), c))[:short]:
            quota[c] += 1
        return quota

    def _eligible(self) -> list[Cell]:
        cells = self.cells
        if self.config.schedule == "broad_to_subtle" and self.target:
            lo, hi = self.config.difficulty_min, self.config.difficulty_max
            progress = sum(self.filled.values()) / self.target
            ceiling = lo + int(progress * (hi - lo + 1))
            cells = [c for c in cells if c[2] <= ceiling] or cells
        return cells

    def _pick_cell(self) -> Cell:
        def load(c: Cell) -> float:
            q = self.quota[c]
            return (self.filled[c] + self.inflight[c]) / q if q > 0 else float("inf")

        cells = self._eligible()
        if self.target is not None:
            open_cells = [c for c in cells if self.filled[c] + self.inflight[c] < self.quota[c]]
            # Every cell is full or spoken for: over-ask the least-loaded cells, since some
            # in-flight requests will be rejected.
            cells = open_cells or cells
        best = min(load(c) for c in cells)
        return self.rng.choice([c for c in cells if load(c) == best])

    # -- outcomes ---------------------------------------------------------------------

    def accepted(self, request: Request, record: Record) -> None:
        """A request's record is durable: it counts toward coverage and may become a parent."""
        if request.cell is not None:
            self.inflight[request.cell] -= 1
        self.observe(record)

    def rejected(self, request: Request) -> None:
        """A request failed: it frees its cell and counts for nothing."""
        if request.cell is not None:
            self.inflight[request.cell] -= 1

    def observe(self, record: Record) -> None:
        """Count a record already in the store (used on resume and for accepted records)."""
        self.filled[cell_of(record)] += 1
        self.domains[record.axes.domain] += 1
        if record.mode != "minimal_pair" and record.generation < self.config.max_generation:
            self.parents.append(record)

    def coverage(self) -> list[dict[str, object]]:
        """Filled vs quota per cell, for the summary and the manifest."""
        return [
            {
                "cue_kind": c[0],
                "distractor_kind": c[1],
                "difficulty": c[2],
                "filled": self.filled[c],
                "quota": self.quota[c] if self.target is not None else None,
            }
            for c in self.cells
        ]

    # -- requests ---------------------------------------------------------------------

    def next(self) -> Request:
        """The next request to send."""
        self.index += 1
        roll = self.rng.random()
        if roll < self.config.undirected_share:
            return self._undirected()
        cell = self._pick_cell()
        self.inflight[cell] += 1
        if self.parents and self.rng.random() < self.config.evolve_share:
            return self._evolution(cell)
        return self._directed(cell)

    def _card_for(self, cell: Cell) -> Card:
        cue, dis, d = cell
        fits = [
            c
            for c in self.cards.cards
            if cue in c.cue_kinds and dis in c.distractor_kinds and d in c.difficulty
        ]
        return self.rng.choice(fits)

    def _axes(self, card: Card, cell: Cell, domain: str | None = None) -> Axes:
        if domain is None:
            least = min(self.domains[d] for d in card.domains)
            domain = self.rng.choice([d for d in card.domains if self.domains[d] == least])
        return Axes(
            cue_kind=CueKind(cell[0]),
            distractor_kind=DistractorKind(cell[1]),
            domain=Domain(domain),
            emotion=Emotion(self.rng.choice(card.emotions)),
            momentum=Momentum(self.rng.choice(card.momentum)),
        )

    def _system(self) -> str:
        pool = self.cards.examples
        example = example_json(pool[self.index % len(pool)]) if pool else "(none)"
        return self.cards.render("system.j2", example=example)

    def _request(self, card: str, user: str, **fields: object) -> Request:
        messages = [
            {"role": "system", "content": self._system()},
            {"role": "user", "content": user},
        ]
        digest = hashlib.sha256(orjson.dumps(messages)).hexdigest()[:16]
        return Request(
            index=self.index, card=card, messages=messages, prompt_hash=digest, **fields
        )  # type: ignore[arg-type]

    def _directed(self, cell: Cell) -> Request:
        card = self._card_for(cell)
        axes = self._axes(card, cell)
        user = self.cards.render(
            card.template,
            card=card,
            axes=axes,
            difficulty=cell[2],
            difficulty_text=DIFFICULTY[cell[2]],
        )
        return self._request(
            card.id,
            user,
            mode="directed",
            schema_name="scenario",
            axes=axes,
            difficulty=cell[2],
            cell=cell,
        )

    def _evolution(self, cell: Cell) -> Request:
        cue, dis, d = cell
        parents = list(self.parents)
        # Prefer parents that share the cell's distractor and sit at or below its difficulty,
        # so the child is a genuine step toward this cell rather than a random rewrite.
        close = [p for p in parents if p.axes.distractor_kind == dis and p.difficulty <= d]
        parent = self.rng.choice(close or parents)
        card = self.cards.by_id.get(parent.provenance.card) or self._card_for(cell)
        if d > parent.difficulty:
            op = self.rng.choice(["subtler_cue", "stronger_distractor", "lengthen_context"])
        elif cue != parent.axes.cue_kind:
            op = "change_cue_kind"
        else:
            op = self.rng.choice(["add_emotion", "reverse_momentum", "move_domain"])
        domain = None if op == "move_domain" else parent.axes.domain
        if op == "move_domain":
            others = [x for x in Domain if x != parent.axes.domain]
            domain = self.rng.choice(others)
        axes = self._axes(card, cell, domain)
        if op == "add_emotion" and axes.emotion == Emotion.neutral:
            axes.emotion = self.rng.choice([e for e in Emotion if e != Emotion.neutral])
        user = self.cards.render(
            "evolve.j2",
            parent=_parent_text(parent),
            operator=OPERATORS[op],
            axes=axes,
            difficulty=d,
            difficulty_text=DIFFICULTY[d],
        )
        return self._request(
            card.id,
            user,
            mode="evolved",
            schema_name="scenario",
            axes=axes,
            difficulty=d,
            cell=cell,
            group_id=parent.group_id,
            parent_id=parent.id,
            generation=parent.generation + 1,
            operator=op,
        )

    def _undirected(self) -> Request:
        user = self.cards.render("undirected.j2")
        return self._request(
            "undirected",
            user,
            mode="undirected",
            schema_name="scenario_undirected",
            axes=None,
            difficulty=None,
            cell=None,
        )


def _parent_text(parent: Record) -> str:
    lines = [f"{m.role}: {m.content}" for m in parent.messages]
    lines.append(f"assistant (listening): {parent.target.content}")
    return "\n".join(lines)
