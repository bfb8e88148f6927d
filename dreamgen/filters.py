"""Rule filters: reject the obvious failures a guided-decoding model still produces."""

from __future__ import annotations

import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from dreamgen.record import Record
from dreamgen.taxonomy import all_values
from dreamgen.validate import Rejected


class Reason(StrEnum):
    """Why a rule filter rejects a record."""

    too_short = "too_short"
    boilerplate = "boilerplate"
    placeholder = "placeholder"  # placeholder text instead of content
    echoed_prompt = "echoed_prompt"  # the prompt's own words copied as content
    repeated_turn = "repeated_turn"  # a message repeats another word for word
    listening_pushes_idea = "listening_pushes_idea"


BOILERPLATE = re.compile(
    r"\b(as an ai\b|as a language model|i'?m just an ai|i cannot assist|i can'?t assist"
    r"|i'?m sorry, but i)",
)
# Openers that pitch an alternative instead of following the user.
PUSH_OPENERS = re.compile(
    r"^\W*(instead\b|how about\b|what if (we|you)\b|have you considered\b"
    r"|actually,? (let'?s|we|you)|i'?d (still )?(suggest|recommend)"
    r"|i (still )?(suggest|recommend|think we should)|rather than)",
    re.IGNORECASE,
)
WORD = re.compile(r"[a-z0-9']+")
# fmt: off
STOP = frozenset([
    "a", "an", "the", "to", "of", "and", "or", "in", "on", "for", "with", "it", "is", "be",
    "this", "that", "you", "your", "we", "i", "me", "my", "at", "as", "by", "so", "if", "do",
    "just", "can", "will", "would", "could", "should", "it's", "that's",
])
# fmt: on
MIN_CHARS = 12

# Substrings that every match of a pattern below contains (checked by hand against each
# alternative). ``in`` runs in C at memory speed, so a clean text, the common case, skips
# the regex scan (25-50 µs per record each); a text holding one runs the pattern as before.
BOILERPLATE_NEEDLES = (
    "as an ai", "as a language model", "m just an ai", "assist", "m sorry, but i",
)  # fmt: skip
PLACEHOLDER_NEEDLES = ("<", "[", "{{", "}}", "lorem ipsum")
ECHO_NEEDLES = (
    "_",  # every snake_case label, extra_cues/extra_distractors, decision_turn, idea_turn
    "the user", "the assistant", "decision turn", "idea turn", "listening r", "reflex r",
    "field guide", "format example",
)  # fmt: skip


def _search(pattern: re.Pattern[str], needles: tuple[str, ...], text: str) -> re.Match[str] | None:
    """``pattern.search(text)``, skipped when ``text`` holds none of the pattern's needles."""
    if any(n in text for n in needles):
        return pattern.search(text)
    return None


# Placeholder text instead of content: "<the user's first message>", "[insert name]",
# template braces, lorem ipsum, a bare ellipsis.
PLACEHOLDER = re.compile(
    r"<[a-z']+(?: [a-z']+){2,}>|\[(?:insert|your|name of|placeholder|user|assistant)\b[^\]]{0,40}\]"
    r"|\{\{|\}\}|\blorem ipsum\b"
)
BARE = re.compile(r"\W*(?:\.\.\.|…|tbd|todo|n/a|none|null)\W*")
# The prompt's own vocabulary written as conversation: field names, snake_case labels,
# words that only describe the format. The 135M model copies literal prompt phrases
# (it once wrote "The user's first message" as the opening).
# Every snake_case taxonomy value, from the taxonomy itself: a new value is covered at once.
LABEL_WORDS = sorted((v for values in all_values().values() for v in values if "_" in v), key=len)
ECHO = re.compile(
    r"\b(?:the user'?s (?:first|last|next|own) (?:message|turn)|the assistant'?s (?:next|own) "
    r"(?:reply|message|idea)|decision[ _]turn|idea[ _]turn|extra_(?:cues|distractors)"
    r"|listening (?:reply|response)|reflex (?:reply|response)|field guide|format example"
    r"|(?:" + "|".join(re.escape(v) for v in reversed(LABEL_WORDS)) + r"))\b",
)
# A whole message that is only a label from the prompt ("Situation", "Topic", "Opening").
# fmt: off
LABELS = frozenset([
    "situation", "topic", "setting", "opening", "exchanges", "idea", "cue", "listening",
    "reflex", "direction", "example", "json", "user", "assistant", "before", "after", "kind",
    "difficulty", "momentum", "mood",
])
# fmt: on
ECHO_NGRAM = 5  # words: a run this long copied from the instructions is an echo


def _ngrams(text: str, n: int = ECHO_NGRAM) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    out = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if sum(w not in STOP for w in gram) >= n // 2:
            out.add(gram)
    return out


@lru_cache(maxsize=1)
def instruction_ngrams() -> frozenset[tuple[str, ...]]:
    """Word n-grams of the text that instructs the model: taxonomy descriptions, difficulty
    definitions and the shipped templates (Jinja tags removed). Card situations are left
    out: a conversation may rightly reuse the words of its own situation."""
    from dreamgen.cards import PROMPTS_DIR
    from dreamgen.taxonomy import DESCRIPTIONS, DIFFICULTY

    texts = [*DESCRIPTIONS.values(), *DIFFICULTY.values()]
    for path in sorted(Path(PROMPTS_DIR, "templates").glob("*.j2")):
        texts.append(re.sub(r"\{\{.*?\}\}|\{%.*?%\}", "|", path.read_text(encoding="utf-8")))
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        for line in re.split(r"[|\n]", text):
            grams |= _ngrams(line)
    return frozenset(grams)


def check_echo(texts: list[str], words: list[list[str]] | None = None) -> None:
    """Reject placeholders and instruction text copied into the conversation.

    ``words`` (each text's ``WORD`` tokens, lowercased) may be passed in to share the work.
    """
    grams = instruction_ngrams()
    words = words or [WORD.findall(t.lower()) for t in texts]
    n = ECHO_NGRAM
    # One regex pass over all texts (lowercased) rather than one per text per pattern.
    joined = "\n".join(texts).lower()
    hit = _search(PLACEHOLDER, PLACEHOLDER_NEEDLES, joined)
    if hit:
        raise Rejected(Reason.placeholder, f"placeholder text {hit.group(0)[:40]!r}")
    hit = _search(ECHO, ECHO_NEEDLES, joined)
    if hit:
        raise Rejected(Reason.echoed_prompt, f"prompt vocabulary {hit.group(0)!r} in a message")
    for text, ws in zip(texts, words, strict=True):
        if BARE.fullmatch(text.lower()):
            raise Rejected(Reason.placeholder, f"placeholder text {text.strip()[:40]!r}")
        if " ".join(ws) in LABELS:
            raise Rejected(
                Reason.echoed_prompt, f"a message is only the prompt label {text.strip()!r}"
            )
        # The n-gram tuples are made by zip and tested by isdisjoint, both in C: the hot
        # path. Only a text that does copy is walked again, for the message.
        if not grams.isdisjoint(zip(*(ws[k:] for k in range(n)), strict=False)):
            gram = next(g for g in zip(*(ws[k:] for k in range(n)), strict=False) if g in grams)
            raise Rejected(Reason.echoed_prompt, f"copies the instructions: {' '.join(gram)!r}")


def _content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP}


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def check_repeats(texts: list[str], words: list[list[str]] | None = None) -> None:
    """Reject a conversation in which one message repeats another word for word."""
    seen: set[str] = set()
    words = words or [WORD.findall(t.lower()) for t in texts]
    for text, ws in zip(texts, words, strict=True):
        key = " ".join(ws)
        if key and key in seen:
            raise Rejected(Reason.repeated_turn, f"a message repeats another: {text[:50]!r}")
        seen.add(key)


def check(record: Record) -> None:
    """Raise ``Rejected`` if the record fails a rule filter."""
    for msg in (record.target, record.contrast):
        if len(msg.content.strip()) < MIN_CHARS:
            raise Rejected(Reason.too_short, f"a response is under {MIN_CHARS} characters")
    texts = [m.content for m in record.messages] + [record.target.content, record.contrast.content]
    hit = _search(BOILERPLATE, BOILERPLATE_NEEDLES, "\n".join(texts).lower())
    if hit:
        raise Rejected(Reason.boilerplate, f"contains {hit.group(0)!r}")
    words = [WORD.findall(t.lower()) for t in texts]
    check_echo(texts, words)
    check_repeats(texts, words)
    target = record.target.content
    if PUSH_OPENERS.search(target):
        raise Rejected(
            Reason.listening_pushes_idea, "the listening response opens with an alternative"
        )
    opener = _content_words(_first_sentence(target))
    for span in record.distractors:
        idea = _content_words(span.text)
        # The listening reply may mention the idea briefly, but not lead with it.
        if len(idea) >= 3 and len(opener & idea) / len(idea) >= 0.6:
            raise Rejected(
                Reason.listening_pushes_idea, "the listening response opens by restating the idea"
            )
