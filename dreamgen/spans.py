"""Find a model's quote in a message and return exact character offsets into the original.

Exact match first; then a tolerant match that forgives whitespace, case and quote-mark
drift and maps the hit back onto the original text. A quote found more than once takes
the first occurrence at or after ``after`` (the end of the previous quote in the same
message, so quotes given in order land in order), else the first occurrence overall:
deterministic, and never a guess between equals.
"""

from __future__ import annotations

_FOLD = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "`": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
        "\u00a0": " ",
        "\u2026": "...",
    }
)
_TRIM = " \t\n\r\"'.,;:!?"


def _fold(text: str) -> tuple[str, list[int]]:
    """Normalise ``text`` and keep, for each output character, its index in ``text``."""
    out: list[str] = []
    index: list[int] = []
    prev_space = False
    for i, ch in enumerate(text):
        mapped = ch.translate(_FOLD)
        if mapped.isspace():
            if prev_space or not out:
                continue
            out.append(" ")
            index.append(i)
            prev_space = True
            continue
        prev_space = False
        low = mapped.lower()
        if len(low) != len(mapped):  # e.g. 'İ'.lower() has two code points: keep it as is
            low = mapped
        for c in low:
            out.append(c)
            index.append(i)
    return "".join(out), index


def _pick(haystack: str, needle: str, after: int) -> int:
    hit = haystack.find(needle, after)
    return hit if hit >= 0 else haystack.find(needle)


def find_quote(content: str, quote: str, after: int = 0) -> tuple[int, int] | None:
    """Offsets ``(start, end)`` of ``quote`` in ``content``, or ``None`` if it is not there."""
    if not quote or not content:
        return None
    hit = _pick(content, quote, after)
    if hit >= 0:
        return hit, hit + len(quote)
    needle, _ = _fold(quote.strip(_TRIM))
    needle = needle.strip()
    if not needle:
        return None
    folded, index = _fold(content)
    folded_after = next((k for k, i in enumerate(index) if i >= after), len(index))
    hit = _pick(folded, needle, folded_after)
    if hit < 0:
        return None
    start, end = index[hit], index[hit + len(needle) - 1] + 1
    # A folded '...' came from one '…': the end index already covers the whole character.
    return start, end
