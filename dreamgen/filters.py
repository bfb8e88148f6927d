"""Rule filters: reject the obvious failures a guided-decoding model still produces."""

from __future__ import annotations

import re

from dreamgen.record import Record
from dreamgen.validate import Rejected

BOILERPLATE = re.compile(
    r"\b(as an ai\b|as a language model|i'?m just an ai|i cannot assist|i can'?t assist"
    r"|i'?m sorry, but i)",
    re.IGNORECASE,
)
# Openers that pitch an alternative instead of following the user.
PUSH_OPENERS = re.compile(
    r"^\W*(instead\b|how about\b|what if (we|you)\b|have you considered\b|actually,? (let'?s|we|you)"
    r"|i'?d (still )?(suggest|recommend)|i (still )?(suggest|recommend|think we should)|rather than)",
    re.IGNORECASE,
)
WORD = re.compile(r"[a-z0-9']+")
STOP = frozenset(
    "a an the to of and or in on for with it is be this that you your we i me my at as by so "
    "if do just can will would could should it's that's".split()
)
MIN_CHARS = 12


def _content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP}


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def check(record: Record) -> None:
    """Raise ``Rejected`` if the record fails a rule filter."""
    for msg in (record.target, record.contrast):
        if len(msg.content.strip()) < MIN_CHARS:
            raise Rejected("too_short", f"a response is under {MIN_CHARS} characters")
    for text in [m.content for m in record.messages] + [record.target.content, record.contrast.content]:
        hit = BOILERPLATE.search(text)
        if hit:
            raise Rejected("boilerplate", f"contains {hit.group(0)!r}")
    target = record.target.content
    if PUSH_OPENERS.search(target):
        raise Rejected("listening_pushes_idea", "the listening response opens with an alternative")
    opener = _content_words(_first_sentence(target))
    for span in record.distractors:
        idea = _content_words(span.text)
        # The listening reply may mention the idea briefly, but not lead with it.
        if len(idea) >= 3 and len(opener & idea) / len(idea) >= 0.6:
            raise Rejected(
                "listening_pushes_idea", "the listening response opens by restating the idea"
            )
