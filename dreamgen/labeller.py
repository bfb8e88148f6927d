"""Label direction in a conversation we did not write: by construction, never by quoting.

A decision point is a user turn that follows an assistant turn. Its text is split into
clause segments (``dreamgen.clauses``), and so are the assistant turns before it; a
labeller picks segments, so every span it returns is a segment's core (or a sub-span
found inside one) and its text is at its offsets by construction.

Two labellers share that shape:
- ``rules_labels``: cue phrases in the user turn ("just", "only", "let's", "don't", "we
  decided", "for now", "keep", imperative openers, "no, …" corrections) and idea markers
  in assistant turns ("we could also", "it might be worth", "I'd suggest", …); fast,
  offline and deterministic: the floor an LLM labeller must beat, and its pre-filter.
- the LLM labeller: ``prompt_messages`` shows the model numbered segments (U1… for the
  user turn, A1… for the assistant turns), and the answer names segment ids and kinds
  through one **fixed** JSON schema per run (``response_format``). The ids are an enum of
  ``U1..U{MAX_SHOWN}``/``A1..A{MAX_SHOWN}``: the grammar admits only ids of that form, and
  ``parse_answer`` drops (and counts) an id this conversation does not have. A
  per-conversation enum would be exact but is a new schema per request, which stalls
  vLLM's grammar cache (DESIGN.md); the fixed enum keeps one compiled grammar per run and
  costs one check after. A quote in the answer only narrows a chosen segment (tolerant
  search inside it); when it is not found there the whole segment is the span.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from dreamgen.clauses import core_text, split_clauses
from dreamgen.spans import find_quote
from dreamgen.taxonomy import CueKind, DistractorKind, describe

MAX_SHOWN = 24  # segments shown per side: bounds the prompt and the id enum
SHOW_CHARS = 160  # a shown segment is cut to this many characters
MAX_PICKS = 4  # cues (and distractors) one answer may name

Side = Literal["cue", "distractor"]

# ---------------------------------------------------------------------------------------
# Decision points and their segments
# ---------------------------------------------------------------------------------------


def decision_turns(messages: list[dict[str, str]], all_turns: bool = False) -> list[int]:
    """Indices of decision turns: user turns right after an assistant turn (the last one,
    or with ``all_turns`` every one)."""
    found = [
        i
        for i in range(1, len(messages))
        if messages[i]["role"] == "user" and messages[i - 1]["role"] == "assistant"
    ]
    return found if all_turns else found[-1:]


@dataclass(slots=True)
class Segment:
    """A labelable segment: ``message``'s core ``[start:end]``, with its shown id."""

    sid: str
    message: int
    start: int
    end: int
    text: str


@dataclass(slots=True)
class Point:
    """One decision point: ``messages`` end at the decision turn, segments on both sides."""

    messages: list[dict[str, str]]
    user: list[Segment]
    assistant: list[Segment]

    @property
    def decision(self) -> int:
        return len(self.messages) - 1


def _segments(messages: list[dict[str, str]], indices: list[int]) -> list[Segment]:
    out: list[Segment] = []
    for m in indices:
        text = messages[m]["content"]
        for c in split_clauses(text):
            if not c.blank:  # ids are given once the shown ones are chosen
                out.append(Segment("", m, c.core_start, c.core_end, core_text(text, c)))
    return out


def _shown(
    segments: list[Segment], score: list[bool], prefix: str, limit: int | None
) -> list[Segment]:
    """At most ``limit`` segments, in text order: rule hits first, then the latest."""
    if limit is not None and len(segments) > limit:
        hits = [i for i, hit in enumerate(score) if hit][:limit]
        rest = [i for i in reversed(range(len(segments))) if not score[i]]
        keep = sorted(hits + rest[: limit - len(hits)])
        segments = [segments[i] for i in keep]
    for n, seg in enumerate(segments, 1):
        seg.sid = f"{prefix}{n}"
    return segments


def point_at(messages: list[dict[str, str]], turn: int, limit: int | None = MAX_SHOWN) -> Point:
    """The decision point at ``messages[turn]`` (a user turn after an assistant turn).

    ``limit`` caps the segments per side (what a model is shown; the rules pre-filter
    picks which); None keeps them all (the rules labeller reads everything).
    """
    kept = messages[: turn + 1]
    user = _segments(kept, [turn])
    assistant = _segments(kept, [i for i in range(turn) if kept[i]["role"] == "assistant"])
    if limit is None:
        no_scores: list[bool] = []
        return Point(
            kept, _shown(user, no_scores, "U", None), _shown(assistant, no_scores, "A", None)
        )
    return Point(
        kept,
        _shown(user, [cue_kind(s.text) is not None for s in user], "U", limit),
        _shown(assistant, [distractor_kind(s.text) is not None for s in assistant], "A", limit),
    )


@dataclass(slots=True)
class Span:
    """A chosen span: ``message``'s ``[start:end]`` with a kind."""

    message: int
    start: int
    end: int
    kind: str


@dataclass(slots=True)
class Labels:
    """What a labeller found at one decision point; ``dropped`` counts discarded picks."""

    cues: list[Span] = field(default_factory=list)
    distractors: list[Span] = field(default_factory=list)
    picks: frozenset[str] = frozenset()  # segment ids chosen (for sample agreement)
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def no_direction(self) -> bool:
        return not self.cues


# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------

_I = re.IGNORECASE
_IMPERATIVES = (
    "add|build|change|check|convert|correct|create|delete|do|draft|drop|explain|finish|fix|"
    "format|give|go|help|leave|list|make|move|print|put|remove|rename|replace|return|"
    "rewrite|run|send|set|show|skip|start|stop|summari[sz]e|tell|translate|try|update|use|"
    "write"
)
# Cue kinds in priority order: the first kind whose pattern matches names the segment.
CUE_RULES: list[tuple[CueKind, re.Pattern[str]]] = [
    (
        CueKind.correction,
        re.compile(
            r"^(no|nope|not quite|actually|wait)\b[,.!]?|\bthat'?s (not|wrong)\b|"
            r"\bi (said|meant|asked for)\b|,\s*not\b",
            _I,
        ),
    ),
    (
        CueKind.prior_decision,
        re.compile(
            r"\bwe(?:'ve| have)? (?:already )?(decided|agreed|settled|chose|picked|locked)\b|"
            r"\b(like|as) we (said|discussed|agreed)\b|\bwe'?re sticking with\b",
            _I,
        ),
    ),
    (
        CueKind.constraint,
        re.compile(
            r"\b(has|have|needs?) to (be|fit|run|work|stay)\b|\bmust\b|\bcan'?t\b|\bcannot\b|"
            r"\bnot allowed\b|\bno more than\b|\bat most\b|\bwithout\b|\bdeadline\b",
            _I,
        ),
    ),
    (
        CueKind.scope_limit,
        re.compile(
            r"\bonly\b|\bjust\b|\bfor now\b|\bnothing else\b|\bleave\b.{0,40}\b(alone|as is)\b|"
            r"\bdon'?t (touch|change)\b|\bno need\b",
            _I,
        ),
    ),
    (
        CueKind.preference,
        re.compile(
            r"\bi(?:'d| would)? (prefer|rather)\b|\bi (like|love)\b|\bstick with\b|\bkeep\b", _I
        ),
    ),
    (
        CueKind.explicit_instruction,
        re.compile(rf"\blet'?s\b|\bdon'?t\b|^(please\s+)?({_IMPERATIVES})\b|\bplease\b", _I),
    ),
]
_IDEA = re.compile(
    r"\bwe could\b|\bmight be worth\b|\bi'?d (suggest|recommend)\b|"
    r"\byou (might|may|could) (want|consider|also)\b|\bconsider\b|\bi could\b|"
    r"\bwhile (we'?re|you'?re) at it\b|\bif you (want|like)\b|\bhow about\b|\bwhat about\b|"
    r"\bwhy not\b|\bside note\b|\bby the way\b|\bas an aside\b|\balternatively\b|\binstead\b|"
    r"\bbetter (to|option|approach|off)\b|\b(switch|move|migrate) (it )?to\b|\bworth (a|it)\b",
    _I,
)
# Distractor kinds by topic, in order; an idea matching none is scope creep.
DISTRACTOR_RULES: list[tuple[DistractorKind, re.Pattern[str]]] = [
    (
        DistractorKind.tangent,
        re.compile(r"side note|by the way|as an aside|fascinating|history|walk you through", _I),
    ),
    (
        DistractorKind.unsolicited_refactor,
        re.compile(r"refactor|restructur|rewrit|clean(ing)? up|reorgani[sz]|modular", _I),
    ),
    (
        DistractorKind.premature_optimization,
        re.compile(r"optimi[sz]|faster|performance|speed|cach(e|ing)|parallel|vectori[sz]", _I),
    ),
    (
        DistractorKind.better_tool,
        re.compile(r"switch|migrate|instead|library|framework|\btool\b", _I),
    ),
]


def cue_kind(text: str) -> CueKind | None:
    """The cue kind the rules see in one segment, or None (a segment of one word is none)."""
    if " " not in text.strip():
        return None
    for kind, pattern in CUE_RULES:
        if pattern.search(text):
            return kind
    return None


def distractor_kind(text: str) -> DistractorKind | None:
    """The distractor kind the rules see in one assistant segment, or None."""
    if not _IDEA.search(text):
        return None
    for kind, pattern in DISTRACTOR_RULES:
        if pattern.search(text):
            return kind
    return DistractorKind.scope_creep


def rules_labels(point: Point) -> Labels:
    """The rules labeller: every segment the cue (or idea) rules match."""
    labels = Labels()
    picks: set[str] = set()
    for seg in point.user:
        cue = cue_kind(seg.text)
        if cue is not None:
            labels.cues.append(Span(seg.message, seg.start, seg.end, cue.value))
            picks.add(seg.sid)
    for seg in point.assistant:
        idea = distractor_kind(seg.text)
        if idea is not None:
            labels.distractors.append(Span(seg.message, seg.start, seg.end, idea.value))
            picks.add(seg.sid)
    labels.picks = frozenset(picks)
    return labels


# ---------------------------------------------------------------------------------------
# LLM: prompt, fixed schema, answer
# ---------------------------------------------------------------------------------------

_CUE_KINDS = [k.value for k in CueKind]
_DISTRACTOR_KINDS = [k.value for k in DistractorKind]

SYSTEM = (
    "You label direction in a chat. The user's last message is split into numbered "
    "segments U1, U2, ...; the assistant's earlier messages into A1, A2, ....\n"
    "cues: the U segments where the user gives direction, each with its kind:\n"
    + "".join(f"- {k}: {describe(k)}\n" for k in _CUE_KINDS)
    + "distractors: the A segments where the assistant pushes its own idea, each with its "
    "kind:\n"
    + "".join(f"- {k}: {describe(k)}\n" for k in _DISTRACTOR_KINDS)
    + "quote: the few words of that segment that carry it, copied exactly.\n"
    "If the user gives no direction, cues is []. Answer with JSON only.\n\n"
    "Example.\nAssistant segments:\nA1: The loader reads the CSV row by row.\n"
    "A2: I'd suggest moving the whole thing to Spark so it scales later.\n"
    "User segments:\nU1: Thanks.\nU2: We only have this one laptop, so no Spark.\n"
    "U3: Add a header check to the loader.\n"
    'Answer: {"cues":[{"segment":"U2","kind":"constraint","quote":"We only have this one '
    'laptop"},{"segment":"U3","kind":"explicit_instruction","quote":"Add a header check"}],'
    '"distractors":[{"segment":"A2","kind":"better_tool","quote":"moving the whole thing to '
    'Spark"}]}'
)


def _pick_schema(prefix: str, kinds: list[str], bounded: bool) -> dict[str, Any]:
    quote: dict[str, Any] = {"type": "string"}
    if bounded:
        quote["maxLength"] = 80
    return {
        "type": "array",
        "maxItems": MAX_PICKS,
        "items": {
            "type": "object",
            "properties": {
                "segment": {"enum": [f"{prefix}{n}" for n in range(1, MAX_SHOWN + 1)]},
                "kind": {"enum": kinds},
                "quote": quote,
            },
            "required": ["segment", "kind", "quote"],
            "additionalProperties": False,
        },
    }


def _schema(bounded: bool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "cues": _pick_schema("U", _CUE_KINDS, bounded),
            "distractors": _pick_schema("A", _DISTRACTOR_KINDS, bounded),
        },
        "required": ["cues", "distractors"],
        "additionalProperties": False,
    }


# Two fixed schemas, built once, chosen by the engine's ``schema_dialect``: llama.cpp (the
# embedded engine) needs string bounds to keep a 135M model from rambling; xgrammar in vLLM
# decodes slowly with maxLength, so it gets the unbounded form (max_tokens bounds the
# answer).
RESPONSE_FORMATS: dict[bool, dict[str, Any]] = {
    bounded: {
        "type": "json_schema",
        "json_schema": {"name": "label_answer", "strict": True, "schema": _schema(bounded)},
    }
    for bounded in (True, False)
}


def response_format(bounded: bool) -> dict[str, Any]:
    """The run's one ``response_format`` (``bounded``: with string length limits)."""
    return RESPONSE_FORMATS[bounded]


def prompt_hash() -> str:
    """Hash of what shapes an LLM label: the system prompt and both schemas."""
    payload = orjson.dumps([SYSTEM, RESPONSE_FORMATS[True], RESPONSE_FORMATS[False]])
    return hashlib.sha256(payload).hexdigest()[:16]


def _show(seg: Segment) -> str:
    text = " ".join(seg.text.split())  # one line per segment
    if len(text) > SHOW_CHARS:
        text = text[: SHOW_CHARS - 1] + "…"
    return f"{seg.sid}: {text}"


def prompt_messages(point: Point) -> list[dict[str, str]]:
    """The chat sent for one decision point: fixed system text first, segments last."""
    shown = ["Assistant segments:", *map(_show, point.assistant)]
    if not point.assistant:
        shown.append("(none)")
    shown += ["User segments:", *map(_show, point.user)]
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "\n".join(shown) + "\nAnswer:"},
    ]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Pick(_Model):
    segment: str
    kind: str
    quote: str = ""


class Answer(_Model):
    """The model's answer, as the fixed schema shapes it."""

    cues: list[_Pick]
    distractors: list[_Pick]


class AnswerError(ValueError):
    """An answer that is not the schema's JSON; ``reason`` is the rejection name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _narrow(seg: Segment, quote: str) -> tuple[int, int, bool]:  # (start, end, narrowed)
    """A sub-span of ``seg`` where the quote is (3+ words found inside it), else all of it."""
    quote = quote.strip()
    if len(quote.split()) >= 3:
        hit = find_quote(seg.text, quote)
        if hit is not None and hit[1] - hit[0] < len(seg.text):
            return seg.start + hit[0], seg.start + hit[1], True
    return seg.start, seg.end, False


def parse_answer(point: Point, content: str) -> Labels:
    """Turn one answer into spans; unknown ids, wrong kinds and repeats are dropped, counted."""
    try:
        answer = Answer.model_validate_json(content)
    except ValidationError as exc:
        reason = "invalid_json" if exc.errors()[0]["type"] == "json_invalid" else "schema"
        raise AnswerError(reason, str(exc).splitlines()[0]) from None
    labels = Labels()
    picks: set[str] = set()
    sides: list[tuple[list[_Pick], list[Segment], list[str], list[Span]]] = [
        (answer.cues, point.user, _CUE_KINDS, labels.cues),
        (answer.distractors, point.assistant, _DISTRACTOR_KINDS, labels.distractors),
    ]
    for chosen, segments, kinds, spans in sides:
        by_id = {seg.sid: seg for seg in segments}
        for pick in chosen:
            seg = by_id.get(pick.segment)
            if seg is None:
                labels.dropped["unknown_segment"] += 1
                continue
            if pick.kind not in kinds:
                labels.dropped["unknown_kind"] += 1
                continue
            if pick.segment in picks:
                labels.dropped["repeated_segment"] += 1
                continue
            picks.add(pick.segment)
            start, end, _ = _narrow(seg, pick.quote)
            spans.append(Span(seg.message, start, end, pick.kind))
    labels.picks = frozenset(picks)
    return labels


def agreement(a: Labels, b: Labels) -> float:
    """Two samples' agreement: Jaccard of the segments they chose (both none: 1.0)."""
    union = a.picks | b.picks
    return 1.0 if not union else round(len(a.picks & b.picks) / len(union), 4)
