"""The output contract: one JSONL line per accepted scenario (``schemas/record.schema.json``).

A ``Record`` validates its own invariants, so anything that parses as a Record is
safe to train on: every span is exact, the decision turn is the user's last turn,
cues sit in user turns, distractors in assistant turns or the contrast response.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum

SCHEMA_VERSION = 1

Split = Literal["train", "eval", "probe"]
Mode = Literal["directed", "evolved", "undirected", "minimal_pair"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class Message(_Model):
    """A chat message."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=20_000)]


class Span(_Model):
    """An exact character span: ``text == content[start:end]`` of the message it names.

    ``message`` is an index into ``messages``, or ``"target"`` / ``"contrast"``.
    """

    message: int | Literal["target", "contrast"]
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=0)]
    kind: str
    text: Annotated[str, Field(min_length=1)]


class Axes(_Model):
    """Where the scenario sits in the taxonomy."""

    cue_kind: CueKind
    distractor_kind: DistractorKind
    domain: Domain
    emotion: Emotion
    momentum: Momentum


class Provenance(_Model):
    """How the record was made, enough to reproduce or audit it."""

    card: str
    prompt_hash: str
    model: str
    engine: str
    sampling: dict[str, Any] = {}
    dreamgen_version: str
    created_at: float
    operator: str | None = None  # the evolution operator that made this child, if any


class Record(_Model):
    """One accepted decision-point scenario with exact cue and distractor labels."""

    schema_version: Literal[1] = 1
    id: str
    messages: Annotated[list[Message], Field(min_length=1, max_length=16)]
    target: Message
    contrast: Message
    cues: list[Span]  # at least one, except in a cue_removed minimal pair
    distractors: list[Span] = []
    axes: Axes
    difficulty: Annotated[int, Field(ge=1, le=5)]
    split: Split = "train"
    group_id: str
    parent_id: str | None = None
    generation: Annotated[int, Field(ge=0)] = 0
    mode: Mode = "directed"
    minimal_pair: Literal["cue_removed", "cue_contradicted"] | None = None
    provenance: Provenance
    quality: dict[str, Any] = {}

    def content_of(self, message: int | str) -> str:
        """The text a span's ``message`` field points at."""
        if message == "target":
            return self.target.content
        if message == "contrast":
            return self.contrast.content
        assert isinstance(message, int)
        return self.messages[message].content

    @model_validator(mode="after")
    def _invariants(self) -> Record:
        if not self.cues and self.minimal_pair != "cue_removed":
            raise ValueError("a record needs at least one cue (only a cue_removed pair has none)")
        last = self.messages[-1]
        if last.role != "user":
            raise ValueError("the decision turn (last message) must be the user's")
        if self.target.role != "assistant" or self.contrast.role != "assistant":
            raise ValueError("target and contrast must be assistant messages")
        if _norm(self.target.content) == _norm(self.contrast.content):
            raise ValueError("target and contrast are identical")
        for span in self.cues + self.distractors:
            if isinstance(span.message, int) and not 0 <= span.message < len(self.messages):
                raise ValueError(f"span message index {span.message} out of range")
            content = self.content_of(span.message)
            if not (0 <= span.start < span.end <= len(content)):
                raise ValueError(f"span [{span.start}, {span.end}) outside its message")
            if content[span.start : span.end] != span.text:
                raise ValueError(f"span text {span.text!r} != message[{span.start}:{span.end}]")
        for span in self.cues:
            if not isinstance(span.message, int) or self.messages[span.message].role != "user":
                raise ValueError("a cue must lie in a user turn")
        for span in self.distractors:
            if span.message == "target":
                raise ValueError("a distractor cannot lie in the target response")
            if isinstance(span.message, int) and self.messages[span.message].role != "assistant":
                raise ValueError("a distractor must lie in an assistant turn or the contrast")
        return self


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def content_id(messages: list[Message], target: Message, contrast: Message) -> str:
    """A content hash: the same conversation and responses always get the same id."""
    payload = orjson.dumps(
        [[m.role, m.content] for m in [*messages, target, contrast]],
    )
    return hashlib.sha256(payload).hexdigest()[:32]


def split_for(group_id: str, ratios: Mapping[Split, float]) -> Split:
    """Deterministic split by group: a scenario and its evolutions always land together."""
    u = int(hashlib.sha256(group_id.encode()).hexdigest()[:12], 16) / 16**12
    acc = 0.0
    names: tuple[Split, ...] = ("train", "eval", "probe")
    for name in names:
        acc += ratios.get(name, 0.0)
        if u < acc:
            return name
    return "train"
