from __future__ import annotations

import pytest

from dreamgen.spans import find_quote


def span(content: str, quote: str, after: int = 0) -> str | None:
    hit = find_quote(content, quote, after)
    return None if hit is None else content[hit[0] : hit[1]]


def test_exact_match() -> None:
    assert find_quote("keep it on the csv module", "csv module") == (15, 25)


def test_unicode_offsets_are_code_points() -> None:
    content = "Café ☕ first — then ünïcode: keep the naïve version"
    hit = find_quote(content, "keep the naïve version")
    assert hit is not None
    assert content[hit[0] : hit[1]] == "keep the naïve version"


def test_whitespace_and_case_drift_map_back_to_original() -> None:
    content = "Please,   Keep  it\non the CSV module."
    assert span(content, "keep it on the csv module") == "Keep  it\non the CSV module"


def test_curly_quotes_and_dashes() -> None:
    content = "He said \u201cdon\u2019t touch the parser\u201d \u2014 really."
    assert span(content, '"don\'t touch the parser"') == "don\u2019t touch the parser"
    assert span("a \u2013 b", "a - b") == "a \u2013 b"


def test_repeated_quote_takes_first_at_or_after_hint() -> None:
    content = "no. no. no."
    assert find_quote(content, "no.") == (0, 3)
    assert find_quote(content, "no.", after=3) == (4, 7)
    assert find_quote(content, "no.", after=10) == (0, 3)  # none after: first overall


def test_missing_empty_and_huge() -> None:
    assert find_quote("abc", "xyz") is None
    assert find_quote("abc", "") is None
    assert find_quote("", "abc") is None
    assert find_quote("abc", "   ") is None
    big = "word " * 50_000 + "needle here " + "word " * 50_000
    hit = find_quote(big, "NEEDLE   here")
    assert hit is not None and big[hit[0] : hit[1]] == "needle here"


@pytest.mark.parametrize("ch", ["\u0130", "\u00df", "\ufb01"])
def test_case_folding_that_changes_length_keeps_offsets_valid(ch: str) -> None:
    content = f"x {ch} keep this"
    assert span(content, "KEEP this") == "keep this"
