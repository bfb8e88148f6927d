"""Split a turn into clause/sentence segments with exact character offsets.

A labeller shows a model numbered segments and the model answers with segment ids, so a
label is grounded by construction: its span is a segment (or a sub-span found inside
one), and ``content[start:end]`` is its text, always. The segments **tile** the text:
laid end to end they are the text, byte for byte, so nothing is lost and offsets never
drift. Each segment also has a *core*, the part worth labelling: surrounding whitespace,
a list marker and a trailing ``,;:`` trimmed off (empty for a blank segment).

Where segments end:
- after a newline (so list items and lines of a message stand alone);
- after a sentence end (``.``, ``!``, ``?``, ``…``, closing quotes/brackets, then
  whitespace; common abbreviations such as "e.g." excepted), and after ``。！？``;
- after ``;``, after ``:`` or a dash between spaces, and before ", but/so/because/…/please"
  (a new clause: the comma stays with the clause before);
- never inside a fenced code block (one segment, cut at lines if it is long) or inside
  inline code; a segment longer than ``max_len`` is cut at its last space before the limit.

Offsets are Python ``str`` indices (code points), as everywhere in dreamgen.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

MAX_LEN = 400

_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[ \t]*(?:\n|\Z)|\Z)", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
# A boundary sits at the end of each match.
_BREAK = re.compile(
    r"\n+"  # line ends (runs of blank lines stay with the line before)
    r"|(?<=[.!?…])[\"'”’)\]]*[ \t]+"  # a sentence end, then spaces
    r"|[。！？]+[ \t]*"  # CJK sentence ends need no space
    r"|;[ \t]+"  # clause separators
    r"|:[ \t]+(?=\S)"
    r"|[ \t]+[—–-][ \t]+"
    r"|,[ \t]+(?=(?:but|so|yet|because|though|although|since|unless|whereas|which|"
    r"that's|that is|please|thanks)\b)",
    re.I,
)
_ABBREV = frozenset({"e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "cf."})
_LIST_MARKER = re.compile(r"(?:[-*+•]|\d{1,3}[.)])[ \t]+")
_TRAIL = ",;:"


@dataclass(frozen=True, slots=True)
class Clause:
    """One segment ``text[start:end]``; its core ``text[core_start:core_end]`` (maybe empty)."""

    start: int
    end: int
    core_start: int
    core_end: int
    code: bool = False

    @property
    def blank(self) -> bool:
        """Whether there is nothing to label here (whitespace, a bare list marker)."""
        return self.core_start >= self.core_end


def _core(text: str, start: int, end: int, code: bool) -> tuple[int, int]:
    s, e = start, end
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    if code:
        return s, e
    marker = _LIST_MARKER.match(text, s, e)
    if marker is not None and marker.end() < e:
        s = marker.end()
        while s < e and text[s].isspace():  # the marker takes spaces and tabs, not all blanks
            s += 1
    while e > s and (text[e - 1] in _TRAIL or text[e - 1].isspace()):
        e -= 1
    return (s, e) if s < e else (start, start)


def _masked(text: str) -> str:
    """``text`` with inline code blanked (same length), so no boundary falls inside it."""
    if "`" not in text:
        return text
    return _INLINE_CODE.sub(lambda m: "x" * len(m.group()), text)


def _prose_cuts(text: str, start: int, end: int) -> list[int]:
    """Boundaries inside the prose region ``text[start:end]`` (absolute offsets)."""
    region = _masked(text[start:end])
    cuts: list[int] = []
    for m in _BREAK.finditer(region):
        if m.end() >= len(region) or m.end() == 0:
            continue
        if m.group()[:1] in " \t":  # after '.': not after an abbreviation
            word = region[: m.start()].rsplit(None, 1)
            if word and word[-1].lower() in _ABBREV:
                continue
        cuts.append(start + m.end())
    return cuts


def _wrap(text: str, start: int, end: int, max_len: int, code: bool) -> list[tuple[int, int]]:
    """Cut ``text[start:end]`` into pieces of at most ``max_len`` (at lines or spaces)."""
    pieces: list[tuple[int, int]] = []
    while end - start > max_len:
        limit = start + max_len
        sep = "\n" if code else " "
        cut = text.rfind(sep, start + 1, limit)
        if cut < 0 and code:
            cut = text.rfind(" ", start + 1, limit)
        cut = limit if cut < 0 else cut + 1
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def split_clauses(text: str, max_len: int = MAX_LEN) -> list[Clause]:
    """The segments of ``text`` in order; they tile it exactly (``""`` gives none)."""
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    regions: list[tuple[int, int, bool]] = []  # (start, end, is_code)
    pos = 0
    if "```" in text or "~~~" in text:
        for m in _FENCE.finditer(text):
            if m.start() > pos:
                regions.append((pos, m.start(), False))
            regions.append((m.start(), m.end(), True))
            pos = m.end()
    if pos < len(text):
        regions.append((pos, len(text), False))
    out: list[Clause] = []
    for rstart, rend, code in regions:
        cuts = [] if code else _prose_cuts(text, rstart, rend)
        bounds = [rstart, *cuts, rend]
        for a, b in itertools.pairwise(bounds):
            for s, e in _wrap(text, a, b, max_len, code):
                cs, ce = _core(text, s, e, code)
                out.append(Clause(s, e, cs, ce, code))
    return out


def core_text(text: str, clause: Clause) -> str:
    """The labelable text of ``clause`` in ``text``."""
    return text[clause.core_start : clause.core_end]
