"""Turns made of segments, with exact spans: build, split back, cut out, replace.

Every place that makes a span's offsets by editing text goes through here, so there is one
set of joining rules:

- ``build(before, span, after)``: a turn the model wrote as segments (validate). The span's
  edge whitespace moves into its neighbours and a missing space between words is added,
  so the span is exactly its words and the turn reads right. Nothing else changes.
- ``split(content, start, end)``: the inverse, for showing a record back to the model in
  the shape it writes (evolution): ``build(*split(t, s, e))`` gives ``t, s, e`` again
  whenever ``t[s:e]`` is a span ``build`` could have made.
- ``splice(left, middle, right)``: joins pieces of an *edited* turn (minimal pairs) so they
  read as sentences: a fragment cut short is closed with a full stop, a new sentence starts
  with a capital, one space at each seam. ``cut`` and ``replace`` are made of it.

Each returns the text and the offsets of the middle piece in it; the caller builds the
``Span`` from those offsets, so a span's text is always the text at its offsets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple, Protocol

PUNCT = ".,;:!?"
SENTENCE_END = ".!?"
# What may hang off a fragment that ran into a cut: separators and connectives.
DANGLING = re.compile(
    r"(?:[\s,;:\u2014-]+|\s+(?:and|but|so|or|because|since|as|that|then|which))+$", re.I
)


class Joined(NamedTuple):
    """A joined turn and the offsets of its middle segment."""

    text: str
    start: int
    end: int


class Located(Protocol):
    """Anything with a character range (a ``Span``)."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


def _joins_words(left: str, right: str) -> bool:
    # "I said" + "keep it" needs a space; '"' + "keep" or "keep" + "." does not.
    return (left.isalnum() or left in PUNCT) and right.isalnum()


def build(before: str, span: str, after: str) -> Joined:
    """``before + span + after`` as one turn; the offsets of ``span``'s words in it.

    ``span`` must have a non-blank core (validate rejects a blank cue before this).
    """
    core = span.strip()
    lead = span[: len(span) - len(span.lstrip())]
    trail = span[len(span.rstrip()) :]
    before = before + lead
    after = trail + after
    if before and core and _joins_words(before[-1], core[0]):
        before += " "
    if after and core and _joins_words(core[-1], after[0]):
        after = " " + after
    start = len(before)
    return Joined(before + core + after, start, start + len(core))


def split(content: str, start: int, end: int) -> tuple[str, str, str]:
    """``content`` as ``(before, span, after)`` around ``[start, end)``: ``build``'s inverse."""
    return content[:start], content[start:end], content[end:]


def close(left: str) -> str:
    """End a fragment that ran into a cut as a sentence: "…in the review and" becomes
    "…in the review." (a dangling separator or connective goes; a full stop is added)."""
    left = left.rstrip()
    if not left or left[-1] in SENTENCE_END:
        return left
    trimmed = DANGLING.sub("", left)
    return (trimmed + ".") if trimmed and trimmed[-1] not in SENTENCE_END else trimmed


def splice(left: str, middle: str, right: str) -> Joined:
    """``left + middle + right`` reading as sentences, one space at each seam; the offsets
    of ``middle`` in the result (``middle`` may be empty: the seam is then left-right)."""
    left, right = close(left), right.lstrip()
    prev = middle or left
    if not prev or prev[-1] in SENTENCE_END:
        # A new sentence starts here: "instead." + ", so what" → "instead. So what".
        right = right.lstrip(PUNCT).lstrip()
        if right[:1].islower():
            right = right[0].upper() + right[1:]
    pre = " " if left and middle else ""
    post = " " if (left or middle) and right and right[0] not in PUNCT + ")" else ""
    start = len(left) + len(pre)
    return Joined(left + pre + middle + post + right, start, start + len(middle))


def cut(content: str, spans: Sequence[Located]) -> str:
    """``content`` with ``spans`` (all inside it, not overlapping) removed."""
    for span in sorted(spans, key=lambda s: s.start, reverse=True):
        content = splice(content[: span.start], "", content[span.end :]).text
    return content


def replace(content: str, start: int, end: int, new: str) -> Joined:
    """``content`` with ``[start, end)`` replaced by ``new``; the offsets of ``new``."""
    return splice(content[:start], new, content[end:])
