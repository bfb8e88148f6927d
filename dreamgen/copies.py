"""The copy filter: reject an answer that copies what its prompt showed the model.

A small model leans on the worked example in its system prompt (DESIGN.md); a fresh
``make demo`` once wrote the ``notebook-plot-fix`` example nearly verbatim under another
card. The echo filter (``dreamgen.filters``) catches instruction phrases; this stage
measures how much of a record was *copied*, from everything the request showed:

- the worked example that request's system prompt showed (``Request.example``; the
  example rotates over every card's, so it is usually another card's),
- the instructions: the shipped templates (Jinja tags removed), the taxonomy
  descriptions, difficulty levels and evolution operators,
- the card's own situation (and its stakes notes), with an allowance: a conversation
  may rightly reuse the words of its own situation, up to ``situation_allowance`` of its
  n-grams; only what lies beyond that counts as copied.

The measure, per part (the conversation; the two responses): the share of the part's
word n-gram positions whose n-gram occurs in what was shown. A part above ``max_share``
rejects the record (``copied_prompt``); the higher share is kept in
``quality.copy_share`` either way.

What is left out, on purpose: an evolved request also shows its parent, and a child
rightly keeps much of it (dedup bounds how close it may come).

Gram sets are built once per card, per example and per (card, example) pair; a record
costs one tokenisation and one set lookup per n-gram (see ``bench/run.py``'s stage times).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import StrEnum

from dreamgen import segments
from dreamgen.cards import Card, CardSet
from dreamgen.config import CopyConfig
from dreamgen.record import Record
from dreamgen.request import Request
from dreamgen.scenario import Scenario

Gram = tuple[str, ...]
Grams = frozenset[Gram]
Kinds = dict[Gram, int]
EMPTY: Grams = frozenset()
SHOWN, OWN = 1, 2  # a gram the prompt showed; one only in the card's own situation
MAX_PAIRS = 10_000  # cached (card, example) source pairs; ids from outside the library too


class Reason(StrEnum):
    """Why the copy filter rejects a record."""

    copied_prompt = "copied_prompt"  # too much of it is copied from what the prompt showed


# Everything but letters, digits and the apostrophe separates words. str.translate and
# str.split run in C, several times faster than a regex (the hot path); both sides of the
# comparison use the same tokenisation, which is all that matters here.
_SEPARATORS = str.maketrans(
    dict.fromkeys(
        [chr(c) for c in range(128) if not (chr(c).isalnum() or chr(c) == "'")]
        + list("\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00a0"),
        " ",
    )
)
_SEP = "\x00"  # joins the word lists of several texts; in no gram set, so no gram spans it


def words(text: str) -> list[str]:
    """The lowercased words n-grams are made of."""
    return text.lower().translate(_SEPARATORS).split()


def ngrams(texts: Iterable[str], n: int) -> Grams:
    """Every word n-gram of each text (never across two texts)."""
    out: set[Gram] = set()
    for text in texts:
        ws = words(text)
        out.update(zip(*(ws[k:] for k in range(n)), strict=False))
    return frozenset(out)


def example_texts(example: Scenario) -> list[str]:
    """A worked example as the messages it stands for (turns joined from their segments)."""
    texts = [example.opening]
    for ex in example.exchanges:
        texts += [ex.assistant, ex.user]
    idea, dec = example.idea_turn, example.decision_turn
    texts.append(segments.build(idea.before, idea.idea, idea.after).text)
    texts.append(segments.build(dec.before, dec.cue, dec.after).text)
    texts += [example.listening, example.reflex]
    return texts


def instruction_texts(cards: CardSet) -> list[str]:
    """The prompt text that instructs the model, as fragments that appear verbatim."""
    from dreamgen.planner import OPERATORS
    from dreamgen.taxonomy import DESCRIPTIONS, DIFFICULTY

    texts = [*DESCRIPTIONS.values(), *DIFFICULTY.values(), *OPERATORS.values()]
    for path in sorted((cards.root / "templates").glob("*.j2")):
        source = path.read_text(encoding="utf-8")
        # A Jinja tag is filled with other text: no n-gram spans it.
        texts += re.split(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", source, flags=re.S)
    return texts


def situation_texts(card: Card) -> list[str]:
    """A card's own wording that its directed prompts show."""
    return [card.situation, *card.stakes.values()]


class CopyIndex:
    """Precomputed gram sets of everything a request can show, and the per-record measure."""

    def __init__(self, cards: CardSet, config: CopyConfig) -> None:
        self.config = config
        n = config.ngram
        self.instructions = ngrams(instruction_texts(cards), n)
        self.examples = {
            eid: ngrams(example_texts(ex), n) for eid, ex in cards.examples_by_id.items()
        }
        # An example id this library does not know (an answer replayed under other cards):
        # compare with every example, the strict side.
        self.any_example = frozenset().union(*self.examples.values())
        self.situations = {c.id: ngrams(situation_texts(c), n) for c in cards.cards}
        # (card, example) -> every gram the request showed: SHOWN (counted in full) or OWN
        # (the card's situation only: counted beyond the allowance).
        self._pairs: dict[tuple[str, str], Kinds] = {}

    def sources(self, request: Request) -> Kinds:
        """What ``request`` showed, as one lookup table: each gram is ``SHOWN`` (the
        instructions and the example) or ``OWN`` (only in the card's situation)."""
        key = (request.card, request.example)
        hit = self._pairs.get(key)
        if hit is not None:
            return hit
        if request.example == "":
            example = EMPTY
        else:
            example = self.examples.get(request.example, self.any_example)
        shown = self.instructions | example
        kinds = dict.fromkeys(self.situations.get(request.card, EMPTY) - shown, OWN)
        kinds.update(dict.fromkeys(shown, SHOWN))
        if len(self._pairs) < MAX_PAIRS:  # the library bounds it (cards × examples)
            self._pairs[key] = kinds
        return kinds

    def _grams(self, texts: Sequence[str]) -> tuple[list[Gram], int]:
        """The n-grams of ``texts`` joined, and how many lie within a single text."""
        n = self.config.ngram
        joined: list[str] = []
        total = 0  # n-gram positions within the texts (none that span two)
        for text in texts:
            ws = words(text)
            total += max(0, len(ws) - n + 1)
            joined += ws
            joined.append(_SEP)
        # zip over shifted lists makes the n-gram tuples in C; a gram spanning _SEP is in
        # no set, so it finds nothing.
        return list(zip(*(joined[k:] for k in range(n)), strict=False)), total

    def share(self, texts: Sequence[str], kinds: Kinds) -> float:
        """The copied share of one part: n-gram positions that are ``SHOWN``, plus those
        that are ``OWN`` beyond the allowance, over all n-gram positions of ``texts``."""
        grams, total = self._grams(texts)
        if total == 0:
            return 0.0
        # One hash and lookup per n-gram, counted in C: this is the hot path.
        found = list(map(kinds.get, grams))
        extra = max(0.0, found.count(OWN) - self.config.situation_allowance * total)
        return (found.count(SHOWN) + extra) / total

    def measure(self, record: Record, request: Request) -> tuple[float, str]:
        """The higher copied share of the record's two parts, and which part it is."""
        kinds = self.sources(request)
        conversation = self.share([m.content for m in record.messages], kinds)
        responses = self.share([record.target.content, record.contrast.content], kinds)
        if responses > conversation:
            return responses, "responses"
        return conversation, "conversation"

    def explain(self, record: Record, request: Request, part: str) -> str:
        """Which shown text a rejected part copies most from (for the rejection message)."""
        texts = (
            [m.content for m in record.messages]
            if part == "conversation"
            else [record.target.content, record.contrast.content]
        )
        grams, _ = self._grams(texts)
        candidates: list[tuple[str, Grams]] = [("the instructions", self.instructions)]
        if request.example:
            example = self.examples.get(request.example, self.any_example)
            candidates.append((f"the worked example {request.example}", example))
        if request.card in self.situations:
            candidates.append((f"card {request.card}'s situation", self.situations[request.card]))
        return max(candidates, key=lambda c: sum(map(c[1].__contains__, grams)))[0]
