"""segments: one set of joining rules, checked by round trips over arbitrary text."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from dreamgen import segments

# Words, spaces, punctuation, non-ASCII and astral characters: offsets are code points.
TEXT = st.text(alphabet=st.sampled_from(list("ab cZ.,!?;:-\n\t\"'(é中🚀")), max_size=40)
CORE = TEXT.filter(lambda s: s.strip() != "")


@dataclass
class Span:
    start: int
    end: int


@given(TEXT, CORE, TEXT)
def test_build_labels_exactly_the_words_and_keeps_the_rest(before: str, span: str, after: str):
    text, start, end = segments.build(before, span, after)
    assert text[start:end] == span.strip()
    # Everything the model wrote is still there, in order; at most one space was added.
    assert text.startswith(before)
    assert text.endswith(after)
    assert len(before) + len(span) + len(after) <= len(text) <= len(before + span + after) + 2


@given(TEXT, CORE, TEXT)
def test_split_is_the_inverse_of_build(before: str, span: str, after: str):
    text, start, end = segments.build(before, span, after)
    assert segments.build(*segments.split(text, start, end)) == (text, start, end)


def test_build_adds_a_space_between_words_only():
    assert segments.build("I said", "keep it", ".") == ("I said keep it.", 7, 14)
    assert segments.build('"', " keep it ", '"') == ('" keep it "', 2, 9)
    text, start, end = segments.build("🚀 ok,", "ship it", "")
    assert text == "🚀 ok, ship it" and text[start:end] == "ship it" and start == 6


@given(TEXT, st.integers(0, 40), st.integers(0, 40), CORE)
def test_replace_puts_the_new_text_at_its_offsets(content: str, a: int, b: int, new: str):
    a, b = sorted((min(a, len(content)), min(b, len(content))))
    text, start, end = segments.replace(content, a, b, new)
    assert text[start:end] == new


@given(TEXT, st.integers(0, 40), st.integers(0, 40))
def test_cut_removes_the_span_and_joins_the_rest(content: str, a: int, b: int):
    a, b = sorted((min(a, len(content)), min(b, len(content))))
    out = segments.cut(content, [Span(a, b)])
    assert out == segments.splice(content[:a], "", content[b:]).text
    assert len(out) <= len(content) + 2  # at most a full stop and a space added


def test_cut_reads_as_sentences():
    content = "Fix the date format and only that. Thanks!"
    start = content.index(" and only that")
    out = segments.cut(content, [Span(start, start + len(" and only that"))])
    assert out == "Fix the date format. Thanks!"
    content = "Ok, only the tests, then we ship."
    s = content.index("only the tests")
    assert segments.cut(content, [Span(s, s + len("only the tests"))]) == "Ok. Then we ship."


def test_cut_several_spans_right_to_left():
    content = "Keep it short. Use bash. Do not add flags."
    spans = [Span(0, 14), Span(25, 42)]
    assert segments.cut(content, spans) == "Use bash."
