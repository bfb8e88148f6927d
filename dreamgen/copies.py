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

Gram sets are built once, at start; a record costs one tokenisation and one table lookup
per n-gram (see ``bench/run.py``'s stage times).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import StrEnum

from dreamgen import segments
from dreamgen.cards import Card, CardSet
from dreamgen.config import CopyConfig
from dreamgen.evolution import OPERATORS
from dreamgen.record import Record
from dreamgen.request import Request
from dreamgen.scenario import Scenario

Gram = tuple[str, ...]
Grams = frozenset[Gram]


class Reason(StrEnum):
    """Why the copy filter rejects a record."""

    copied_prompt = "copied_prompt"  # too much of it is copied from what the prompt showed


# Everything but letters, digits, the apostrophe and NUL separates words. str.translate and
# str.split run in C, several times faster than a regex (the hot path); both sides of the
# comparison use the same tokenisation, which is all that matters here.
_SEP = "\x00"  # joins the texts of one part; a word of its own, in no gram, so no gram spans it
_SEPARATORS = str.maketrans(
    dict.fromkeys(
        [chr(c) for c in range(1, 128) if not (chr(c).isalnum() or chr(c) == "'")]
        + list("\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00a0"),
        " ",
    )
)
_JOIN = f" {_SEP} "


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
    """Precomputed gram sets of everything a request can show, and the per-record measure.

    One table maps each gram to a bit mask of the sources that hold it: bit 0 the
    instructions, one bit per worked example, one per card's situation. A request only
    picks its bits, so nothing is built per request or per (card, example) pair; a record
    costs one tokenisation and one lookup per n-gram, all in C but for the hits.
    """

    def __init__(self, cards: CardSet, config: CopyConfig) -> None:
        self.config = config
        n = config.ngram
        examples = {eid: ngrams(example_texts(ex), n) for eid, ex in cards.examples_by_id.items()}
        situations = {c.id: ngrams(situation_texts(c), n) for c in cards.cards}
        table: dict[Gram, int] = dict.fromkeys(ngrams(instruction_texts(cards), n), 1)
        self._example_bits: dict[str, int] = {}
        self._card_bits: dict[str, int] = {}
        bit = 2
        for bits, sources in ((self._example_bits, examples), (self._card_bits, situations)):
            for key, grams in sources.items():
                bits[key] = bit
                for g in grams:
                    table[g] = table.get(g, 0) | bit
                bit <<= 1
        self._table = table
        # An example id this library does not know (an answer replayed under other cards):
        # compare with every example, the strict side.
        self._any_example = sum(self._example_bits.values())

    def masks(self, request: Request) -> tuple[int, int]:
        """The bits of what ``request`` showed in full (the instructions and its example),
        and of what it showed with an allowance (its card's situation)."""
        example = 0
        if request.example:
            example = self._example_bits.get(request.example, self._any_example)
        return 1 | example, self._card_bits.get(request.card, 0)

    def _words(self, texts: Sequence[str]) -> tuple[list[str], int]:
        """The words of ``texts`` joined by a separator word, and how many n-gram positions
        lie within a single text (none that span two)."""
        n = self.config.ngram
        ws = _JOIN.join(texts).lower().translate(_SEPARATORS).split()
        total, start, end = 0, 0, 0
        while end < len(ws):
            try:
                end = ws.index(_SEP, start)
            except ValueError:
                end = len(ws)
            total += max(0, end - start - n + 1)
            start = end + 1
        return ws, total

    def _grams(self, ws: list[str]) -> Iterable[Gram]:
        # zip over shifted lists makes the n-gram tuples in C; a gram spanning _SEP is in
        # no source, so it finds nothing.
        return zip(*(ws[k:] for k in range(self.config.ngram)), strict=False)

    def share(self, texts: Sequence[str], shown: int, own: int) -> float:
        """The copied share of one part: n-gram positions held by a ``shown`` source, plus
        those held only by an ``own`` one beyond the allowance, over all n-gram positions."""
        ws, total = self._words(texts)
        if total == 0:
            return 0.0
        copied = extra = 0
        for mask in filter(None, map(self._table.get, self._grams(ws))):
            if mask & shown:
                copied += 1
            elif mask & own:
                extra += 1
        return (copied + max(0.0, extra - self.config.situation_allowance * total)) / total

    def measure(self, record: Record, request: Request) -> tuple[float, str]:
        """The higher copied share of the record's two parts, and which part it is."""
        shown, own = self.masks(request)
        conversation = self.share([m.content for m in record.messages], shown, own)
        responses = self.share([record.target.content, record.contrast.content], shown, own)
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
        shown, own = self.masks(request)
        found = [m for m in map(self._table.get, self._grams(self._words(texts)[0])) if m]
        candidates = [("the instructions", 1)]
        if request.example:
            candidates.append((f"the worked example {request.example}", shown & ~1))
        if own:
            candidates.append((f"card {request.card}'s situation", own))
        return max(candidates, key=lambda c: sum(1 for m in found if m & c[1]))[0]
