"""Clause segments: they tile the text exactly, and cut where a reader would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dreamgen.clauses import core_text, split_clauses

# Text built from the pieces that matter to the splitter, plus arbitrary characters
# (astral ones included).
PIECES = st.sampled_from(
    [
        ". ",
        "! ",
        "? ",
        "\n",
        "\n\n",
        "; ",
        ": ",
        " - ",
        ", but ",
        "e.g. ",
        "`a. b`",
        "```",
        "~~~",
        "```py\n",
        "- ",
        "1. ",
        "。",
        "…",
        "\u00a0",
        "😀",
        "𝔸",
        "\t",
        " ",
        ", ",
    ]
)
TEXT = st.lists(st.one_of(PIECES, st.text(max_size=12)), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(TEXT, st.integers(min_value=1, max_value=50))
def test_segments_tile_the_text_exactly(text: str, max_len: int) -> None:
    clauses = split_clauses(text, max_len=max_len)
    assert "".join(text[c.start : c.end] for c in clauses) == text
    pos = 0
    for c in clauses:
        assert c.start == pos and c.end > c.start  # contiguous, never empty
        assert c.end - c.start <= max_len or c.code
        assert c.start <= c.core_start <= c.core_end <= c.end
        core = core_text(text, c)
        assert core == core.strip()  # a core never starts or ends with whitespace
        assert c.blank == (core == "")
        pos = c.end
    assert pos == len(text)


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_code_is_cut_only_at_lines_when_long(text: str) -> None:
    for c in split_clauses(text, max_len=10_000):
        assert c.end - c.start <= 10_000


def cores(text: str) -> list[str]:
    return [core_text(text, c) for c in split_clauses(text) if not c.blank]


def test_sentences_clauses_and_please() -> None:
    text = "Just clone it before the call, that's fine. Show me the three lines, please."
    assert cores(text) == [
        "Just clone it before the call",
        "that's fine.",
        "Show me the three lines",
        "please.",
    ]


def test_abbreviations_decimals_and_inline_code_do_not_cut() -> None:
    text = "Use a tool, e.g. ripgrep. Version 3.5 is fine. Run `make test. now` first."
    assert cores(text) == [
        "Use a tool, e.g. ripgrep.",
        "Version 3.5 is fine.",
        "Run `make test. now` first.",
    ]


def test_fenced_code_is_one_segment_and_list_items_stand_alone() -> None:
    text = "Fix:\n```python\nx = 1. y = 2\nprint(x)\n```\n- first item. More\n2) second item\n"
    segments = split_clauses(text)
    code = [c for c in segments if c.code]
    assert len(code) == 1
    assert core_text(text, code[0]) == "```python\nx = 1. y = 2\nprint(x)\n```"
    assert cores(text) == [
        "Fix",
        "```python\nx = 1. y = 2\nprint(x)\n```",
        "first item.",
        "More",
        "second item",
    ]


def test_non_ascii_offsets_are_code_points() -> None:
    text = "😀😀 Ça marche. 你好。只要第一部分。"
    got = [(c.core_start, c.core_end) for c in split_clauses(text) if not c.blank]
    # By hand: "😀😀 " is 3 code points; "Ça marche." is 10; then "你好。" and "只要第一部分。".
    assert got == [(0, 13), (14, 17), (17, 24)]


def test_a_long_run_without_punctuation_is_cut_at_spaces() -> None:
    text = " ".join(["word"] * 300)  # 1499 characters, no sentence end
    segments = split_clauses(text, max_len=100)
    assert all(c.end - c.start <= 100 for c in segments)
    assert all(text[c.end - 1] == " " for c in segments[:-1])  # never inside a word


def test_a_list_marker_followed_by_other_blanks_leaves_a_clean_core() -> None:
    # Found by hypothesis: the marker regex takes spaces and tabs, so a no-break space
    # after "- " was left at the start of the core.
    text = ".  - \xa0. "
    for c in split_clauses(text, max_len=5):
        core = core_text(text, c)
        assert core == core.strip(), (c, core)
