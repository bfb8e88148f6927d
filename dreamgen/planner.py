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
from collections.abc import Sequence

import orjson

from dreamgen import evolution
from dreamgen.cards import Card, CardSet
from dreamgen.config import PlanConfig
from dreamgen.record import Axes, Record
from dreamgen.request import Cell, Request
from dreamgen.taxonomy import (
    DIFFICULTY,
    CueKind,
    DistractorKind,
    Domain,
    Emotion,
    Momentum,
    Stakes,
)

# The bucket undirected records fill; kept in the same counters as the cells so that a
# planner rebuilt on reload (which copies ``filled`` and ``inflight``) keeps it too.
UNDIRECTED: Cell = ("undirected", "*", 0)
# Stakes values with a quota of their own (direction vs correctness); "none" is the rest.
STAKES: tuple[str, ...] = tuple(s.value for s in Stakes if s != Stakes.none)


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
        # Stakes draw from their own stream: turning the share on or off leaves the rest of
        # a seed's plan (cells, modes, cards) as it was.
        self.stakes_rng = random.Random(f"stakes-{config.seed}")
        self.index = 0
        self.filled: Counter[Cell] = Counter()
        self.inflight: Counter[Cell] = Counter()
        self.domains: Counter[str] = Counter()
        # Directed and evolved records (and requests) by stakes value; orthogonal to cells.
        self.stakes_filled: Counter[str] = Counter()
        self.stakes_inflight: Counter[str] = Counter()
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
        # The units left go to the largest remainders. Ties (common: equal weights, so equal
        # remainders) go to the cell whose cue kind, then distractor kind, then difficulty
        # has the fewest so far, so a small target spreads over the axes instead of filling
        # the alphabetically first cue kind (a 20-record demo once got only `constraint`).
        given: Counter[tuple[int, object]] = Counter()
        for c, q in quota.items():
            for axis, value in enumerate(c):
                given[axis, value] += int(q)
        left = set(raw)
        for _ in range(short):
            best = min(
                left,
                key=lambda c: (
                    -round(raw[c] - quota[c], 9),
                    *(given[axis, value] for axis, value in enumerate(c)),
                    c,
                ),
            )
            left.discard(best)
            quota[best] += 1
            for axis, value in enumerate(best):
                given[axis, value] += 1
        return quota

    def stakes_quota(self) -> dict[str, int] | None:
        """Records per stakes value (beyond "none") the target holds; None: no target.

        ``stakes_share`` of the directed part of the target, split evenly (largest
        remainder); a value no card allows gets 0, since nothing could fill it.
        """
        if self.target is None:
            return None
        allowed = [v for v in STAKES if any(v in c.stakes_allowed for c in self.cards.cards)]
        n = round((self.target - (self.undirected_quota or 0)) * self.config.stakes_share)
        quota = dict.fromkeys(STAKES, 0)
        for i in range(n if allowed else 0):
            quota[allowed[i % len(allowed)]] += 1
        return quota

    def _stakes_open(self, value: str, quota: dict[str, int] | None) -> bool:
        """Whether the target still has room for a record of stakes ``value`` (``quota``:
        ``stakes_quota()``)."""
        if quota is None:
            return True
        load = self.stakes_filled[value] + self.stakes_inflight[value]
        if value == Stakes.none.value:
            directed = (self.target or 0) - (self.undirected_quota or 0)
            return load < directed - sum(quota.values())
        return load < quota.get(value, 0)

    def _pick_stakes(self, cell: Cell) -> str:
        """The stakes value for a directed request in ``cell``: a closed loop like the
        undirected share (a roll mixes them over time; the counts decide at the end)."""
        share = self.config.stakes_share
        roll = self.stakes_rng.random()
        if share <= 0:
            return Stakes.none.value
        cue, dis, d = cell
        servable = {
            v
            for c in self.cards.cards
            if cue in c.cue_kinds and dis in c.distractor_kinds and d in c.difficulty
            for v in c.stakes_allowed
        } - {Stakes.none.value}
        quota = self.stakes_quota()
        if quota is None:
            values = sorted(servable)
            return self.stakes_rng.choice(values) if values and roll < share else Stakes.none.value
        load = {v: self.stakes_filled[v] + self.stakes_inflight[v] for v in STAKES}
        open_values = sorted(v for v in servable if self._stakes_open(v, quota))
        if not open_values:
            return Stakes.none.value
        if roll < share or not self._stakes_open(Stakes.none.value, quota):
            least = min(load[v] for v in open_values)
            return self.stakes_rng.choice([v for v in open_values if load[v] == least])
        return Stakes.none.value

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
            progress = self._directed_filled() / n
        else:
            # No target: open a level per 100 accepted records.
            progress = self._directed_filled() / (100 * (hi - lo + 1))
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
        loads = {c: load(c) for c in cells}
        best = min(loads.values())
        return self.rng.choice([c for c, x in loads.items() if x == best])

    # -- outcomes ---------------------------------------------------------------------

    @staticmethod
    def _slot(request: Request) -> Cell | None:
        return UNDIRECTED if request.mode == "undirected" else request.cell

    def _release(self, request: Request) -> None:
        slot = self._slot(request)
        if slot is not None:
            self.inflight[slot] -= 1
        if request.axes is not None:
            self.stakes_inflight[request.axes.stakes] -= 1

    def accepted(self, request: Request, record: Record) -> None:
        """A request's record is durable: it counts toward coverage and may become a parent."""
        self._release(request)
        self.observe(record)

    def rejected(self, request: Request) -> None:
        """A request failed: it frees its cell and counts for nothing."""
        self._release(request)

    def _directed_filled(self) -> int:
        """Directed and evolved records accepted so far (the cells; undirected apart)."""
        return sum(self.filled[c] for c in self.cells)

    def has_room(self, record: Record, pending: Sequence[str]) -> bool:
        """Whether the target still has room for ``record``'s side (undirected, or directed
        and evolved), counting records accepted but not yet durable (``pending``: their
        modes). Over-asking may land more of one side than its share; the surplus is
        dropped, so a small target keeps its composition. No target: always room."""
        uq = self.undirected_quota  # None exactly when there is no target
        if uq is None or record.mode == "minimal_pair":
            return True
        if record.mode == "undirected":
            have = self.filled[UNDIRECTED] + pending.count("undirected")
            return have < uq
        have = self._directed_filled()
        have += sum(1 for mode in pending if mode not in ("undirected", "minimal_pair"))
        return have < (self.target or 0) - uq

    def observe(self, record: Record) -> None:
        """Count a record already in the store (used on resume and for accepted records).

        Minimal pairs are derived from a record already counted: they count nowhere.
        """
        if record.mode == "minimal_pair":
            return
        self.filled[UNDIRECTED if record.mode == "undirected" else cell_of(record)] += 1
        if record.mode != "undirected":
            self.stakes_filled[record.axes.stakes] += 1
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
        quota = self.stakes_quota()
        for value in STAKES:
            if self.config.stakes_share > 0 or self.stakes_filled[value]:
                rows.append(
                    {
                        "cue_kind": f"(stakes {value})",
                        "distractor_kind": "*",
                        "difficulty": "*",
                        "filled": self.stakes_filled[value],
                        "quota": quota[value] if quota is not None else None,
                    }
                )
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
            elif not u_open:
                # Both sides spoken for: over-ask the side that still lacks the larger share
                # of its quota, so that a low-yield side is not outrun by the other (an
                # over-asked record that lands is kept, and the run stops on the total).
                u_need = max(0, uq - self.filled[UNDIRECTED]) / uq
                d_quota = sum(self.quota.values())
                d_left = sum(max(0.0, self.quota[c] - self.filled[c]) for c in self.cells)
                d_need = d_left / d_quota if d_quota > 0 else 0.0
                if u_need != d_need:
                    want = u_need > d_need
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

    def _card_for(self, cell: Cell, stakes: str = Stakes.none.value) -> Card:
        cue, dis, d = cell
        fits = [
            c
            for c in self.cards.cards
            if cue in c.cue_kinds
            and dis in c.distractor_kinds
            and d in c.difficulty
            and stakes in c.stakes_allowed
        ]
        return self.rng.choice(fits)

    def _axes(
        self, card: Card, cell: Cell, domain: str | None = None, stakes: str = Stakes.none.value
    ) -> Axes:
        if domain is None:
            least = min(self.domains[d] for d in card.domains)
            domain = self.rng.choice([d for d in card.domains if self.domains[d] == least])
        return Axes(
            cue_kind=CueKind(cell[0]),
            distractor_kind=DistractorKind(cell[1]),
            domain=Domain(domain),
            emotion=Emotion(self.rng.choice(card.emotions)),
            momentum=Momentum(self.rng.choice(card.momentum)),
            stakes=Stakes(stakes),
        )

    def _system(self) -> tuple[str, str]:
        """The system prompt and the id of the worked example it shows ("" if none)."""
        ids = self.cards.example_ids
        example_id = ids[self.index % len(ids)] if ids else ""
        return self.cards.system_prompt(example_id), example_id

    def _request(self, card: str, user: str, **fields: object) -> Request:
        system, example_id = self._system()
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]
        digest = hashlib.sha256(orjson.dumps(messages)).hexdigest()[:16]
        return Request(
            index=self.index,
            card=card,
            messages=messages,
            prompt_hash=digest,
            example=example_id,
            **fields,
        )

    def _directed(self, cell: Cell) -> Request:
        stakes = self._pick_stakes(cell)
        card = self._card_for(cell, stakes)
        axes = self._axes(card, cell, stakes=stakes)
        self.stakes_inflight[axes.stakes] += 1
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
        _, dis, d = cell
        parents = list(self.parents)
        # Prefer parents that share the cell's distractor and sit at or below its difficulty,
        # so the child is a genuine step toward this cell rather than a random rewrite.
        close = [p for p in parents if p.axes.distractor_kind == dis and p.difficulty <= d]
        close = close or parents
        # The child keeps its parent's stakes (below): a parent whose stakes side is full
        # would overfill it, so pick among those with room while there are any.
        quota = self.stakes_quota()
        room = {v.value for v in Stakes if self._stakes_open(v.value, quota)}
        fits = [p for p in close if p.axes.stakes in room]
        parent = self.rng.choice(fits or close)
        card = self.cards.by_id.get(parent.provenance.card) or self._card_for(cell)
        op, domain = evolution.pick(self.rng, parent, cell)
        # The child keeps its parent's stakes: the parent's text carries the problem.
        stakes = parent.axes.stakes if parent.axes.stakes in card.stakes_allowed else "none"
        axes = self._axes(card, cell, domain, stakes=stakes)
        self.stakes_inflight[axes.stakes] += 1
        if op == "add_emotion" and axes.emotion == Emotion.neutral:
            axes.emotion = self.rng.choice([e for e in Emotion if e != Emotion.neutral])
        user = self.cards.render(
            "evolve.j2",
            parent=evolution.parent_text(parent),
            operator=evolution.OPERATORS[op],
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
