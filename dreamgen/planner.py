"""The planner: decides what to ask the model for next.

Closed-loop coverage: every taxonomy cell (cue kind × distractor kind × difficulty) has a
quota; the next request goes to the cell furthest below its quota, counting accepted
records and requests still in flight (a rejected request frees its slot and counts for
nothing). Within a cell the planner picks a card that allows it and spreads domains.

It also runs the dream loop (accepted scenarios evolve into subtler children that keep
their parent's group) and undirected dreaming. Undirected records label their own axes, so
they cannot be steered into a cell: they get their own bucket (``undirected_share`` of the
target) and the cell quotas share out the rest, which keeps every cell reachable exactly.
Minimal pairs (``dreamgen.pairs``) are derived from accepted records and count nowhere.

Every choice draws from one seeded RNG and the counts, so a given seed and sequence of
outcomes always yields the same plan.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from dreamgen.cards import Card, CardSet, example_json
from dreamgen.pairs import PairKind
from dreamgen.record import Axes, Mode, Record
from dreamgen.taxonomy import DIFFICULTY, CueKind, DistractorKind, Domain, Emotion, Momentum

Cell = tuple[str, str, int]  # (cue_kind, distractor_kind, difficulty)
# The bucket undirected records fill; kept in the same counters as the cells so that a
# planner rebuilt on reload (which copies ``filled`` and ``inflight``) keeps it too.
UNDIRECTED: Cell = ("undirected", "*", 0)

OPERATORS: dict[str, str] = {
    "subtler_cue": "make the user's direction subtler: shorter, less explicit, easier to miss, "
    "but still clear to a careful reader.",
    "stronger_distractor": "make the assistant's idea more tempting: a real benefit, a concrete "
    "reason, argued with confidence.",
    "add_emotion": "give the user a clear emotional undercurrent that adds pressure.",
    "reverse_momentum": "make the earlier exchanges head the opposite way from the direction, "
    "so the direction has to turn the conversation.",
    "move_domain": "move the whole situation to the setting below, keeping its shape: same kind "
    "of direction, same kind of temptation, new people and details.",
    "lengthen_context": "add an earlier exchange, so more talk sits between the start and the "
    "direction.",
    "change_cue_kind": "carry the direction in the way named below instead.",
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
    # Share of accepted scenarios that also get minimal-pair variants (chosen by record id,
    # so the choice is stable across runs); which variants to derive.
    minimal_pairs: Annotated[float, Field(ge=0, le=1)] = 0.0
    minimal_pair_kinds: list[PairKind] = ["cue_removed", "cue_contradicted"]


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

    @property
    def undirected_quota(self) -> int | None:
        """How many undirected records the target holds (None: no target)."""
        if self.target is None:
            return None
        return round(self.target * self.config.undirected_share)

    def _quotas(self) -> dict[Cell, float]:
        weights = {c: self._weight(c) for c in self.cells}
        total = sum(weights.values())
        if self.target is None or total <= 0:
            return weights
        # Largest-remainder apportionment: integer quotas that sum exactly to what the
        # target leaves after the undirected bucket.
        n = self.target - (self.undirected_quota or 0)
        raw = {c: n * w / total for c, w in weights.items()}
        quota = {c: float(int(v)) for c, v in raw.items()}
        short = n - int(sum(quota.values()))
        for c in sorted(raw, key=lambda c: (-(raw[c] - quota[c]), c))[:short]:
            quota[c] += 1
        return quota

    def _open(self, cells: list[Cell]) -> list[Cell]:
        return [c for c in cells if self.filled[c] + self.inflight[c] < self.quota[c]]

    def ceiling(self) -> int:
        """The highest difficulty the schedule allows now.

        ``uniform``: the whole range. ``broad_to_subtle``: the range opens one level at a
        time as accepted records fill the target, so early data is broad and later subtle.
        """
        lo, hi = self.config.difficulty_min, self.config.difficulty_max
        if self.config.schedule != "broad_to_subtle":
            return hi
        if self.target:
            n = max(1, self.target - (self.undirected_quota or 0))
            progress = sum(self.filled[c] for c in self.cells) / n
        else:
            # No target: open a level per 100 accepted records.
            progress = sum(self.filled[c] for c in self.cells) / (100 * (hi - lo + 1))
        return min(hi, lo + int(progress * (hi - lo + 1)))

    def _pick_cell(self) -> Cell:
        def load(c: Cell) -> float:
            q = self.quota[c]
            return (self.filled[c] + self.inflight[c]) / q if q > 0 else float("inf")

        ceiling = self.ceiling()
        allowed = [c for c in self.cells if c[2] <= ceiling] or self.cells
        cells = allowed
        if self.target is not None:
            # Open cells the schedule allows; else the easiest open cells beyond it (the
            # in-flight window may be wider than what is left below the ceiling); else,
            # every cell full or spoken for, over-ask the least-loaded allowed cells, since
            # some in-flight requests will be rejected.
            open_cells = self._open(allowed)
            if not open_cells:
                rest = self._open(self.cells)
                if rest:
                    easiest = min(c[2] for c in rest)
                    open_cells = [c for c in rest if c[2] == easiest]
            cells = open_cells or allowed
        best = min(load(c) for c in cells)
        return self.rng.choice([c for c in cells if load(c) == best])

    # -- outcomes ---------------------------------------------------------------------

    @staticmethod
    def _slot(request: Request) -> Cell | None:
        return UNDIRECTED if request.mode == "undirected" else request.cell

    def accepted(self, request: Request, record: Record) -> None:
        """A request's record is durable: it counts toward coverage and may become a parent."""
        slot = self._slot(request)
        if slot is not None:
            self.inflight[slot] -= 1
        self.observe(record)

    def rejected(self, request: Request) -> None:
        """A request failed: it frees its cell and counts for nothing."""
        slot = self._slot(request)
        if slot is not None:
            self.inflight[slot] -= 1

    def observe(self, record: Record) -> None:
        """Count a record already in the store (used on resume and for accepted records).

        Minimal pairs are derived from a record already counted: they count nowhere.
        """
        if record.mode == "minimal_pair":
            return
        self.filled[UNDIRECTED if record.mode == "undirected" else cell_of(record)] += 1
        self.domains[record.axes.domain] += 1
        if record.generation < self.config.max_generation:
            self.parents.append(record)

    def coverage(self) -> list[dict[str, object]]:
        """Filled vs quota per cell, for the summary and the manifest.

        Cells count directed and evolved records; undirected records (which label
        themselves) fill one extra row, present when undirected dreaming is on.
        """
        rows: list[dict[str, object]] = [
            {
                "cue_kind": c[0],
                "distractor_kind": c[1],
                "difficulty": c[2],
                "filled": self.filled[c],
                "quota": int(self.quota[c]) if self.target is not None else None,
            }
            for c in self.cells
        ]
        if self.config.undirected_share > 0 or self.filled[UNDIRECTED]:
            rows.append(
                {
                    "cue_kind": "(undirected)",
                    "distractor_kind": "*",
                    "difficulty": "*",
                    "filled": self.filled[UNDIRECTED],
                    "quota": self.undirected_quota,
                }
            )
        return rows

    # -- requests ---------------------------------------------------------------------

    def _wants_undirected(self, roll: float) -> bool:
        share = self.config.undirected_share
        if share <= 0:
            return False
        want = roll < share
        uq = self.undirected_quota
        if uq == 0:
            return False
        if uq is not None:
            # Closed loop here too: the roll mixes the modes over time; the counts decide
            # once one side is full (or spoken for).
            u_open = self.filled[UNDIRECTED] + self.inflight[UNDIRECTED] < uq
            d_open = bool(self._open(self.cells))
            if u_open != d_open:
                want = u_open
        return want

    def next(self) -> Request:
        """The next request to send."""
        self.index += 1
        roll = self.rng.random()
        if self._wants_undirected(roll):
            self.inflight[UNDIRECTED] += 1
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
        return Request(index=self.index, card=card, messages=messages, prompt_hash=digest, **fields)

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
    """The parent in the same JSON shape the model writes, so the rewrite stays in format.

    The segments come back from the record's exact spans: the idea is the first distractor
    in the idea turn, the cue the first cue in the decision turn. A record that does not
    have that shape (hand-labelled data) is shown as plain turns instead.
    """
    msgs = parent.messages
    idea_i, dec_i = len(msgs) - 2, len(msgs) - 1
    idea = next((d for d in parent.distractors if d.message == idea_i), None)
    cue = next((c for c in parent.cues if c.message == dec_i), None)
    roles = [m.role for m in msgs]
    shape = ["user"] + ["assistant", "user"] * ((len(msgs) - 1) // 2)
    if idea is None or cue is None or roles != shape or len(msgs) < 3:
        lines = [f"{m.role}: {m.content}" for m in msgs]
        lines.append(f"assistant: {parent.target.content}")
        return "\n".join(lines)
    it, dt = msgs[idea_i].content, msgs[dec_i].content
    data = {
        "opening": msgs[0].content,
        "exchanges": [
            {"assistant": msgs[i].content, "user": msgs[i + 1].content} for i in range(1, idea_i, 2)
        ],
        "idea_turn": {
            "before": it[: idea.start],
            "idea": idea.text,
            "after": it[idea.end :],
            "kind": idea.kind,
        },
        "decision_turn": {
            "before": dt[: cue.start],
            "cue": cue.text,
            "after": dt[cue.end :],
            "kind": cue.kind,
        },
        "listening": parent.target.content,
        "reflex": parent.contrast.content,
    }
    return orjson.dumps(data).decode()
