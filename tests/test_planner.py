"""The planner: closed-loop coverage, determinism, the dream loop and the curriculum.

Outcomes are simulated: each planned request is answered with a hand-written worked
example (made unique per request) labelled through the real ``validate.label``, and
accepted or rejected by a seeded coin, in a random completion order with a window of
requests in flight, the way the pipeline drives the planner.
"""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from dreamgen.cards import CardSet
from dreamgen.config import PlanConfig
from dreamgen.planner import UNDIRECTED, Planner, cell_of
from dreamgen.record import Record
from dreamgen.request import Request
from dreamgen.scenario import UndirectedScenario
from dreamgen.taxonomy import DIFFICULTY, Domain


def answer(cards: CardSet, request: Request, n: int) -> Record:
    """A valid record for ``request``, as if the model had answered it (unique per ``n``)."""
    from dreamgen.validate import label

    ex = cards.examples[n % len(cards.examples)]
    ex = ex.model_copy(update={"opening": f"{ex.opening} (case {n})"})
    if request.mode == "undirected":
        rng = random.Random(n)
        ex = UndirectedScenario(
            **ex.model_dump(),
            domain=rng.choice(list(Domain)),
            emotion="warm",
            momentum="executing",
            difficulty=rng.randint(1, 5),
        )
    return label(ex, request, model="sim", engine="sim")


def simulate(
    cards: CardSet,
    config: PlanConfig,
    target: int,
    *,
    accept: float | dict[str, float] = 0.6,
    window: int = 8,
    outcome_seed: int = 0,
) -> tuple[Planner, list[Request], list[Record]]:
    """Drive a planner like the pipeline does until ``target`` records are accepted."""
    planner = Planner(cards, config, target)
    coin = random.Random(outcome_seed)
    inflight: list[Request] = []
    issued: list[Request] = []
    accepted: list[Record] = []
    n = 0
    while len(accepted) < target:
        while len(inflight) < window:  # the pipeline issues while the target is not reached
            request = planner.next()
            inflight.append(request)
            issued.append(request)
        request = inflight.pop(coin.randrange(len(inflight)))
        n += 1
        rate = accept if isinstance(accept, float) else accept[request.mode]
        record = answer(cards, request, n)
        if coin.random() < rate and planner.has_room(record, []):
            planner.accepted(request, record)
            accepted.append(record)
        else:
            planner.rejected(request)
        assert n < 50 * target, "the planner does not converge"
    for request in inflight:  # surplus beyond the target is dropped, never counted
        planner.rejected(request)
    return planner, issued, accepted


def within_one(planner: Planner) -> list[dict[str, object]]:
    return [
        row
        for row in planner.coverage()
        if row["quota"] is not None and abs(row["filled"] - row["quota"]) > 1  # type: ignore[operator]
    ]


@pytest.mark.parametrize("accept", [0.9, 0.5, 0.25])
def test_simulated_outcomes_converge_to_quotas(cards: CardSet, accept: float) -> None:
    config = PlanConfig(seed=3, difficulty_min=1, difficulty_max=2)
    planner, _, accepted = simulate(cards, config, 100, accept=accept, outcome_seed=11)
    assert len(planner.cells) >= 50
    assert sum(q for q in planner.quota.values()) == 100
    assert within_one(planner) == []
    # Rejected and surplus requests left nothing behind.
    assert all(v == 0 for v in planner.inflight.values())
    counted = Counter(cell_of(r) for r in accepted)
    assert all(planner.filled[c] == counted[c] for c in planner.cells)


def test_quotas_with_evolution_and_undirected(cards: CardSet) -> None:
    config = PlanConfig(
        seed=5, difficulty_min=1, difficulty_max=2, evolve_share=0.4, undirected_share=0.1
    )
    planner, issued, accepted = simulate(cards, config, 100, accept=0.5, outcome_seed=2)
    assert within_one(planner) == []
    modes = Counter(r.mode for r in accepted)
    assert planner.undirected_quota == 10
    assert abs(modes["undirected"] - 10) <= 1
    assert modes["evolved"] > 10 and modes["directed"] > 10
    rows = planner.coverage()
    assert rows[-1]["cue_kind"] == "(undirected)"
    assert rows[-1]["filled"] == planner.filled[UNDIRECTED] == modes["undirected"]
    # Undirected records label themselves: they fill their own bucket, never a cell.
    assert sum(planner.filled[c] for c in planner.cells) == 100 - modes["undirected"]
    assert {r.mode for r in issued} == {"directed", "evolved", "undirected"}


@pytest.mark.parametrize("outcome_seed", range(8))
def test_a_low_yield_undirected_side_still_gets_its_share(
    cards: CardSet, outcome_seed: int
) -> None:
    """The embedded model rarely writes a valid undirected record: once both sides are
    spoken for, over-asking must go where the quota is still unmet, and a record landing
    on a side already full is surplus (``has_room``), or the directed side fills the whole
    small target first."""
    config = PlanConfig(seed=3, difficulty_min=1, difficulty_max=2, evolve_share=1.0,
                        undirected_share=0.34)  # fmt: skip
    rates = {"directed": 0.9, "evolved": 0.9, "undirected": 0.15}
    _, _, accepted = simulate(cards, config, 3, accept=rates, window=4, outcome_seed=outcome_seed)
    modes = Counter("undirected" if r.mode == "undirected" else "directed" for r in accepted)
    assert modes == {"directed": 2, "undirected": 1}


def test_quota_overrides_weight_cells(cards: CardSet) -> None:
    config = PlanConfig(seed=1, difficulty_min=1, difficulty_max=2, quotas={"*/*/2": 3.0})
    planner, _, _ = simulate(cards, config, 140, accept=0.7)
    by_difficulty: Counter[int] = Counter()
    for c in planner.cells:
        by_difficulty[c[2]] += planner.filled[c]
    assert abs(by_difficulty[1] - 35) <= 1 and abs(by_difficulty[2] - 105) <= 1
    assert {q for c, q in planner.quota.items() if c[2] == 2} == {3.0}
    assert within_one(planner) == []


def test_rejected_requests_do_not_count(cards: CardSet) -> None:
    planner = Planner(cards, PlanConfig(seed=0, difficulty_min=1, difficulty_max=1), 20)
    first = [planner.next() for _ in range(10)]
    assert sum(planner.inflight.values()) == 10
    for request in first:
        planner.rejected(request)
    assert sum(planner.filled.values()) == 0
    assert all(v == 0 for v in planner.inflight.values())
    # A rejected cell is open again: the next request may ask for it once more.
    again = {planner.next().cell for _ in range(20)}
    assert {r.cell for r in first} <= again


def test_inflight_requests_hold_their_cell(cards: CardSet) -> None:
    # Quota 1 everywhere: while a cell's request is in flight, no second one is issued
    # until every other cell has one too.
    planner = Planner(cards, PlanConfig(seed=0, difficulty_min=1, difficulty_max=1), 35)
    assert set(planner.quota.values()) == {1.0}
    cells = [planner.next().cell for _ in range(35)]
    assert len(set(cells)) == 35


def plan_trace(cards: CardSet, config: PlanConfig, outcome_seed: int) -> list[tuple]:
    _, issued, accepted = simulate(cards, config, 40, accept=0.5, outcome_seed=outcome_seed)
    return [
        (r.index, r.mode, r.card, r.cell, r.parent_id, r.operator, r.prompt_hash) for r in issued
    ] + [(r.id,) for r in accepted]


def test_deterministic_for_a_seed_and_outcome_sequence(cards: CardSet) -> None:
    config = PlanConfig(seed=9, evolve_share=0.3, undirected_share=0.1)
    a = plan_trace(cards, config, outcome_seed=4)
    b = plan_trace(cards, config, outcome_seed=4)
    assert a == b
    assert a != plan_trace(cards, config.model_copy(update={"seed": 10}), outcome_seed=4)
    assert a != plan_trace(cards, config, outcome_seed=5)


def test_evolution_lineage_and_bounded_depth(cards: CardSet) -> None:
    config = PlanConfig(seed=2, evolve_share=1.0, max_generation=2)
    _planner, issued, accepted = simulate(cards, config, 60, accept=0.8, window=2)
    by_id = {r.id: r for r in accepted}
    evolved = [r for r in accepted if r.mode == "evolved"]
    assert len(evolved) > 30
    for child in evolved:
        parent = by_id[child.parent_id]
        assert child.group_id == parent.group_id
        assert child.generation == parent.generation + 1
        assert child.provenance.operator in {
            "subtler_cue",
            "stronger_distractor",
            "add_emotion",
            "reverse_momentum",
            "move_domain",
            "lengthen_context",
            "change_cue_kind",
        }
    assert max(r.generation for r in accepted) == 2  # bounded: gen-2 records never parent
    assert all(by_id[r.parent_id].generation < 2 for r in evolved)
    for r in accepted:
        if r.mode == "directed":
            assert r.group_id == r.id and not r.parent_id and r.generation == 0
    # The evolve prompt shows the parent in the answer format and names the change.
    request = next(r for r in issued if r.mode == "evolved")
    shown_parent = by_id[request.parent_id or ""]  # parents are accepted records only
    user = request.messages[-1]["content"]
    shown = orjson.loads(user.split("\n")[1])
    assert shown["decision_turn"]["cue"] == shown_parent.cues[0].text
    assert shown["idea_turn"]["idea"] == shown_parent.distractors[0].text
    assert shown["listening"] == shown_parent.target.content


def test_evolution_moves_toward_the_cell(cards: CardSet) -> None:
    config = PlanConfig(seed=4, evolve_share=1.0, difficulty_min=1, difficulty_max=3)
    _, issued, accepted = simulate(cards, config, 40, accept=1.0, window=1)
    by_id = {r.id: r for r in accepted}
    for request in issued:
        if request.mode != "evolved" or request.parent_id not in by_id:
            continue
        parent = by_id[request.parent_id]
        assert request.axes is not None and request.cell is not None
        assert (request.axes.cue_kind, request.axes.distractor_kind) == request.cell[:2]
        if request.difficulty > parent.difficulty:  # type: ignore[operator]
            assert request.operator in {"subtler_cue", "stronger_distractor", "lengthen_context"}
        if request.operator == "move_domain":
            assert request.axes.domain != parent.axes.domain


def test_broad_to_subtle_schedule(cards: CardSet) -> None:
    config = PlanConfig(seed=1, difficulty_min=1, difficulty_max=3, schedule="broad_to_subtle")
    planner, _issued, accepted = simulate(cards, config, 105, accept=0.7, window=4)
    difficulties = [r.difficulty for r in accepted]
    third = len(difficulties) // 3
    # Early data is broad, late data subtle (a late re-ask of a rejected easier cell aside);
    # the whole range is filled in the end.
    assert max(difficulties[: third - 4]) == 1
    assert sum(d < 3 for d in difficulties[-third:]) <= 4
    assert sum(d == 3 for d in difficulties[:third]) == 0
    assert within_one(planner) == []
    assert planner.ceiling() == 3


def test_broad_to_subtle_with_a_wide_window_moves_on(cards: CardSet) -> None:
    # A window wider than the open easy cells must ask for the next level, not over-ask.
    config = PlanConfig(seed=1, difficulty_min=1, difficulty_max=2, schedule="broad_to_subtle")
    planner = Planner(cards, config, 70)
    requests = [planner.next() for _ in range(70)]
    assert Counter(r.difficulty for r in requests) == {1: 35, 2: 35}


def test_difficulty_range_and_curriculum_in_prompts(cards: CardSet) -> None:
    planner = Planner(cards, PlanConfig(seed=0, difficulty_min=4, difficulty_max=5), 30)
    assert {c[2] for c in planner.cells} == {4, 5}
    for _ in range(30):
        request = planner.next()
        assert request.difficulty in (4, 5)
        assert request.difficulty is not None
        assert DIFFICULTY[request.difficulty] in request.messages[-1]["content"]


def test_shared_prompt_prefix(cards: CardSet) -> None:
    """Every request's system prompt is byte-identical up to the rotating example."""
    planner = Planner(cards, PlanConfig(seed=0, undirected_share=0.2), 50)
    systems = [planner.next().messages[0]["content"] for _ in range(40)]
    marker = "Format example"
    heads = {s[: s.index(marker)] for s in systems}
    assert len(heads) == 1
    assert len({s[s.index(marker) :] for s in systems}) == len(cards.examples)
    # The example is last: the varying part of a request comes after the shared text.
    assert all(s.rstrip().endswith("}") for s in systems)


def test_no_target_runs_open_ended(cards: CardSet) -> None:
    config = PlanConfig(seed=0, undirected_share=0.3, difficulty_min=1, difficulty_max=1)
    planner = Planner(cards, config, None)
    modes = Counter(planner.next().mode for _ in range(200))
    assert 30 < modes["undirected"] < 90
    assert all(row["quota"] is None for row in planner.coverage())
