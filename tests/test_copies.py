"""The copy filter: answers that copy what their prompt showed are rejected (copied_prompt).

The copies here are written by hand (an example's turns pasted in, instruction sentences,
a card's situation restated); the last test builds 20 records on the real embedded model
and checks them with a separate, naive overlap count written for the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from conftest import DEMO_COUNT

import dreamgen
from dreamgen import stages
from dreamgen.cards import CardSet, example_json
from dreamgen.config import Config, CopyConfig, PlanConfig
from dreamgen.copies import CopyIndex, Reason
from dreamgen.dedup import Dedup
from dreamgen.planner import Planner
from dreamgen.request import Request
from dreamgen.scenario import Scenario
from dreamgen.store import Store

ROOT = Path(__file__).resolve().parent.parent

# A conversation about nothing any card or example is about: no copying at all.
FRESH = {
    "opening": "My sourdough starter smells like nail polish remover since Tuesday.",
    "exchanges": [
        {
            "assistant": "How often are you feeding it, and at what ratio?",
            "user": "Once a day, equal flour and water by weight, kept on the fridge top.",
        }
    ],
    "idea_turn": {
        "before": "That smell usually means it is hungry. ",
        "idea": "We could also switch you to a rye starter with a proper hydration log.",
        "after": "",
        "kind": "scope_creep",
    },
    "decision_turn": {
        "before": "Rye sounds like a project. ",
        "cue": "Just tell me how to fix this one.",
        "after": "",
        "kind": "explicit_instruction",
    },
    "listening": "Feed it twice a day at one part starter to two parts flour and water for "
    "three days; the acetone smell should fade by the weekend.",
    "reflex": "You can rescue it, but a rye starter with a hydration log would stop this "
    "from happening again; let me set one up for you first.",
}


@pytest.fixture
def chain(tmp_path: Path, cards: CardSet) -> stages.Chain:
    store = Store(tmp_path / "out", config={}, fingerprint="t")
    return stages.chain_for(
        splits=Config().splits,
        index=Dedup(tmp_path / "dedup"),
        store=store,
        full=lambda _: False,
        copy_index=CopyIndex(cards, CopyConfig()),
        timed=True,
    )


def _directed(cards: CardSet, example: str | None = None, card: str | None = None) -> Request:
    """A real planned request, optionally re-pointed at another shown example or card."""
    request = Planner(cards, PlanConfig(), None).next()
    update: dict[str, str] = {}
    if example is not None:
        update["example"] = example
    if card is not None:
        update["card"] = card
    return request.model_copy(update=update)


def _raw(data: dict[str, object]) -> str:
    return orjson.dumps(data).decode()


def _with(shown: Scenario, **parts: object) -> dict[str, object]:
    """FRESH with some parts replaced by the shown example's own text."""
    data = orjson.loads(_raw(FRESH))
    src = shown.model_dump(mode="json")
    for key, take in parts.items():
        if take:
            data[key] = src[key]
    return data


def test_the_request_names_the_example_its_prompt_shows(cards: CardSet) -> None:
    planner = Planner(cards, PlanConfig(), None)
    for _ in range(len(cards.examples) + 2):
        request = planner.next()
        shown = cards.examples_by_id[request.example]
        assert example_json(shown) in request.messages[0]["content"]


def test_a_fresh_answer_passes_and_records_its_share(chain: stages.Chain, cards: CardSet) -> None:
    item = stages.Item(_directed(cards), _raw(FRESH))
    assert chain.process(item).kept
    assert item.record is not None
    assert 0.0 <= item.record.quality.copy_share < 0.1


def test_copied_example_responses_are_rejected(chain: stages.Chain, cards: CardSet) -> None:
    request = _directed(cards)
    shown = cards.examples_by_id[request.example]
    item = stages.Item(request, _raw(_with(shown, listening=True, reflex=True)))
    outcome = chain.process(item)
    assert outcome.reason is Reason.copied_prompt
    assert "responses" in outcome.message and request.example in outcome.message
    assert chain.times["copies"].rejected == 1


def test_copied_example_conversation_is_rejected(chain: stages.Chain, cards: CardSet) -> None:
    request = _directed(cards)
    shown = cards.examples_by_id[request.example]
    data = _with(shown, opening=True, exchanges=True, idea_turn=True, decision_turn=True)
    outcome = chain.process(stages.Item(request, _raw(data)))
    assert outcome.reason is Reason.copied_prompt and "conversation" in outcome.message


def test_only_the_example_that_was_shown_counts(cards: CardSet) -> None:
    index = CopyIndex(cards, CopyConfig())
    ids = list(cards.examples_by_id)
    copy_of = cards.examples_by_id[ids[0]]
    data = _with(copy_of, listening=True, reflex=True)
    record = dreamgen.validate(_raw(data), _directed(cards, example=ids[0]))
    assert index.measure(record, _directed(cards, example=ids[0]))[0] > 0.9
    # The same text under a request that showed another example copies nothing shown.
    assert index.measure(record, _directed(cards, example=ids[1]))[0] < 0.1
    # An example id this library does not know: compared with every example.
    assert index.measure(record, _directed(cards, example="gone#0"))[0] > 0.9


def test_threshold_is_the_configured_share(cards: CardSet) -> None:
    """Half of the responses' words copied: above a 0.3 limit, below a 0.9 one."""
    request = _directed(cards)
    shown = cards.examples_by_id[request.example]
    data = _with(shown, listening=True)  # listening copied, reflex fresh: about half
    record = dreamgen.validate(_raw(data), request)
    share, part = CopyIndex(cards, CopyConfig()).measure(record, request)
    assert part == "responses" and 0.3 < share < 0.9
    loose = CopyIndex(cards, CopyConfig(max_share=0.9))
    assert stages.CopyCheck(loose).process(stages.Item(request, "", record=record)).kept
    strict = stages.CopyCheck(CopyIndex(cards, CopyConfig(max_share=0.3)))
    assert not strict.process(stages.Item(request, "", record=record)).kept


def test_instruction_sentences_count_as_copied(cards: CardSet) -> None:
    request = _directed(cards)
    data = orjson.loads(_raw(FRESH))
    # Lines of the system prompt and the directed template, written as the responses.
    data["listening"] = (
        "Assistant acknowledges the user, then pushes its own idea with a believable reason."
    )
    data["reflex"] = (
        "The direction follows from what the user said about their situation, and the "
        "assistant wants to do more than was asked."
    )
    record = dreamgen.validate(_raw(data), request)
    share, part = CopyIndex(cards, CopyConfig()).measure(record, request)
    assert part == "responses" and share > 0.3


def test_the_cards_own_situation_has_an_allowance(cards: CardSet) -> None:
    card = cards.by_id["disk-full-logs"]
    other = next(i for i in cards.examples_by_id if not i.startswith(card.id))
    request = _directed(cards, example=other, card=card.id)
    index = CopyIndex(cards, CopyConfig())
    situation = " ".join(card.situation.split())
    # One sentence of the situation reused in a longer fresh conversation: allowed.
    light = orjson.loads(_raw(FRESH))
    light["opening"] = "The site is down. " + situation.split(". ")[0] + ". " + FRESH["opening"]
    rec = dreamgen.validate(_raw(light), request)
    assert index.measure(rec, request)[0] <= 0.3
    # The whole situation pasted as the opening and again as the first answer: beyond it.
    heavy = orjson.loads(_raw(light))
    heavy["opening"] = situation
    heavy["exchanges"][0]["user"] = situation
    rec = dreamgen.validate(_raw(heavy), request)
    share, _ = index.measure(rec, request)
    assert share > 0.3
    # Under a card whose situation it is not, the same text is merely not copied.
    elsewhere = _directed(cards, example=other, card="essay-trim")
    assert index.measure(rec, elsewhere)[0] < 0.1


def test_undirected_requests_are_checked_too(cards: CardSet) -> None:
    planner = Planner(cards, PlanConfig(undirected_share=1.0), None)
    request = planner.next()
    assert request.mode == "undirected" and request.example
    shown = cards.examples_by_id[request.example].model_dump(mode="json")
    data = {
        **shown,
        "domain": "operations",
        "emotion": "neutral",
        "momentum": "executing",
        "difficulty": 2,
    }
    record = dreamgen.validate(_raw(data), request)
    assert CopyIndex(cards, CopyConfig()).measure(record, request)[0] > 0.9


def test_copied_prompt_is_a_known_reason() -> None:
    assert "copied_prompt" in stages.REASONS


# -- a real build ---------------------------------------------------------------------------

WORDS = re.compile(r"[a-z0-9']+")


def _grams(text: str, n: int = 6) -> set[tuple[str, ...]]:
    ws = WORDS.findall(text.lower())
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def _naive_share(texts: list[str], shown: set[tuple[str, ...]]) -> float:
    grams = [g for t in texts for g in _grams(t)]
    return sum(g in shown for g in grams) / len(grams) if grams else 0.0


@pytest.mark.slow
def test_a_demo_build_has_no_record_above_the_copy_threshold(
    demo_build: tuple[Path, str], cards: CardSet
) -> None:
    """`make demo`'s build (embedded SmolLM2, seed 0, shortened): no accepted record
    shares more than 30% of its 6-grams with any worked example in the library (stricter
    than the filter, which knows which one was shown)."""
    out, _ = demo_build
    records = list(dreamgen.read(out))
    assert len(records) == DEMO_COUNT
    examples: set[tuple[str, ...]] = set()
    for ex in cards.examples:
        data = ex.model_dump(mode="json")
        for key in ("opening", "listening", "reflex"):
            examples |= _grams(data[key])
        for turn in ("idea_turn", "decision_turn"):
            t = data[turn]
            examples |= _grams(" ".join((t["before"], t.get("idea") or t.get("cue"), t["after"])))
        for exchange in data["exchanges"]:
            examples |= _grams(exchange["assistant"]) | _grams(exchange["user"])
    worst = []
    for r in records:
        conversation = _naive_share([m.content for m in r.messages], examples)
        responses = _naive_share([r.target.content, r.contrast.content], examples)
        worst.append(max(conversation, responses))
        assert r.quality.copy_share <= 0.3
    print(f"highest share of 6-grams from any example: {max(worst):.3f}")
    assert max(worst) <= 0.3, sorted(worst)[-5:]
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    rejected = manifest["totals"]["rejected"]
    print("rejected:", rejected)
