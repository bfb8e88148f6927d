"""The output contract: one JSONL line per accepted scenario (``schemas/record.schema.json``).

A ``Record`` validates its own invariants, so anything that parses as a Record is
safe to train on: every span is exact, the decision turn is the user's last turn,
cues sit in user turns, distractors in assistant turns or the contrast response.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum, Stakes

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

    ``message`` indexes the whole exchange, ``messages + [target, contrast]``: below
    ``len(messages)`` a context message, ``len(messages)`` the target and
    ``len(messages) + 1`` the contrast. (Always an int: every field keeps one JSON type,
    so shards load with Arrow/``datasets`` without a per-file schema clash.)
    """

    message: Annotated[int, Field(ge=0)]
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
    stakes: Stakes = Stakes.none  # direction vs correctness; records before it read as none


class Sampling(_Model):
    """The sampling parameters a record was generated with (-1 / 0.0 / 1.0: not sent)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 0
    seed: int = -1
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0


class Quality(_Model):
    """Checks and notes attached to a record; fixed fields so every shard has one schema."""

    labels_agree: bool = True  # the model's own kind labels match the requested axes
    model_cue_kind: str = ""
    model_distractor_kind: str = ""
    pair_of: str = ""  # minimal pairs: the record this is a variant of
    variant: str = ""
    target_follows: str = ""
    replaced_cue: str = ""
    # The LLM judge (``dreamgen.judge``; a minimal pair carries its parent's). Fixed types,
    # 0 / "" / False while ``judged`` is False: every shard keeps one schema.
    # The copy filter (``dreamgen.copies``): the higher share of the conversation's or the
    # responses' word n-grams copied from what the prompt showed.
    copy_share: float = 0.0
    judged: bool = False
    judge_model: str = ""
    judge_pairwise: float = 0.0  # share of the two A/B orders that picked the target
    judge_agree: bool = False  # both orders picked the same response (no position bias)
    judge_cue_direction: float = 0.0  # share of cues both orders say carry direction
    judge_kind_agreement: float = 0.0  # share of (cue, order) whose judged kind is the label
    judge_distractor_own: float = 0.0  # share of distractors both say are the assistant's own
    judge_coherence: float = 0.0  # 1-5, mean of the two orders
    judge_difficulty: float = 0.0  # 1-5, mean of the two orders
    judge_problem_named: bool = False  # both orders: the target names the user's error/risk
    judge_failed: str = ""  # failed checks, comma-separated (kept only in judge.mode "score")


class Provenance(_Model):
    """How the record was made, enough to reproduce or audit it."""

    card: str
    prompt_hash: str
    model: str
    engine: str
    sampling: Sampling = Sampling()
    dreamgen_version: str
    created_at: float
    operator: str = ""  # the evolution operator that made this child, if any


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
    parent_id: str = ""  # "" for a root scenario
    generation: Annotated[int, Field(ge=0)] = 0
    mode: Mode = "directed"
    minimal_pair: Literal["", "cue_removed", "cue_contradicted"] = ""
    provenance: Provenance
    quality: Quality = Quality()

    @property
    def target_index(self) -> int:
        """The ``Span.message`` value that names the target response."""
        return target_index(len(self.messages))

    @property
    def contrast_index(self) -> int:
        """The ``Span.message`` value that names the contrast response."""
        return contrast_index(len(self.messages))

    def is_response(self, message: int) -> bool:
        """Whether a ``Span.message`` value names the target or the contrast."""
        return message >= target_index(len(self.messages))

    def content_of(self, message: int) -> str:
        """The text a span's ``message`` field points at."""
        if message == self.target_index:
            return self.target.content
        if message == self.contrast_index:
            return self.contrast.content
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
            if not 0 <= span.message <= self.contrast_index:
                raise ValueError(f"span message index {span.message} out of range")
            content = self.content_of(span.message)
            if not (0 <= span.start < span.end <= len(content)):
                raise ValueError(f"span [{span.start}, {span.end}) outside its message")
            if content[span.start : span.end] != span.text:
                raise ValueError(f"span text {span.text!r} != message[{span.start}:{span.end}]")
        for span in self.cues:
            if self.is_response(span.message) or self.messages[span.message].role != "user":
                raise ValueError("a cue must lie in a user turn")
        for span in self.distractors:
            if span.message == self.target_index:
                raise ValueError("a distractor cannot lie in the target response")
            if (
                not self.is_response(span.message)
                and self.messages[span.message].role != "assistant"
            ):
                raise ValueError("a distractor must lie in an assistant turn or the contrast")
        return self


def target_index(n_messages: int) -> int:
    """``Span.message`` of the target in an exchange of ``n_messages`` context messages."""
    return n_messages


def contrast_index(n_messages: int) -> int:
    """``Span.message`` of the contrast in an exchange of ``n_messages`` context messages."""
    return n_messages + 1


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
