"""Labelled conversations: a chat that stops at a decision point, with exact span labels.

One JSONL line per conversation (``schemas/labelled.schema.json``): ``messages`` ending in
the decision turn (a user message), ``cues`` (where the user's direction is, in user
messages) and ``distractors`` (the assistant's own competing idea, in assistant
messages), each an exact character span ``text == messages[message].content[start:end]``
with offsets in Python ``str`` indices (code points, not bytes or UTF-16 units).
Optional ``listening`` and ``reflex`` are a response that follows the direction and one
that pushes the distractor; ``no_direction`` marks a decision turn that gives none.

This is what ``dreamgen label`` writes and what ``probe``, ``experiment`` and
``judge-eval`` read, real traffic and hand-written sets alike. ``read_labelled`` streams
a file and stops at the first bad line with a one-line ``LabelledError`` naming the
file, the 1-based line and the field; ``iter_labelled(..., errors="skip")`` reports bad
lines to a callback and carries on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from dreamgen.taxonomy import CueKind, DistractorKind

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "labelled.schema.json"

_ERROR_TYPE = "labelled_invariant"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class LabelledMessage(_Model):
    """A chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


class LabelledSpan(_Model):
    """An exact character span: ``text == messages[message].content[start:end]``.

    ``message`` indexes ``messages``; ``start``/``end`` are Python ``str`` indices.
    """

    message: Annotated[int, Field(ge=0)]
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=0)]
    text: Annotated[str, Field(min_length=1)]
    kind: str


class CueSpan(LabelledSpan):
    """A cue: where the user's direction is carried (in a user message)."""

    kind: CueKind


class DistractorSpan(LabelledSpan):
    """A distractor: the assistant's own competing idea (in an assistant message)."""

    kind: DistractorKind


class LabelProvenance(_Model):
    """Where a label came from, for conversations ``dreamgen label`` labelled."""

    labeller: Literal["rules", "llm"]
    engine: str
    model: str
    prompt_hash: str
    input: str  # the input path as given
    input_index: Annotated[int, Field(ge=0)]  # 0-based position of the conversation in it
    turn: Annotated[int, Field(ge=0)]  # index of the decision turn in the input conversation
    samples: Annotated[int, Field(ge=1)] = 1
    dreamgen_version: str


def _short(text: str, limit: int = 60) -> str:
    """``repr`` of ``text``, cut to about ``limit`` characters (always one line)."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _invariant(field: str, detail: str) -> PydanticCustomError:
    return PydanticCustomError(_ERROR_TYPE, "{field}: {detail}", {"field": field, "detail": detail})


class Labelled(_Model):
    """One labelled conversation, stopping at the decision turn (the last, a user message)."""

    id: str | None = None
    group_id: str | None = None
    messages: Annotated[list[LabelledMessage], Field(min_length=1)]
    cues: list[CueSpan]
    distractors: list[DistractorSpan]
    listening: str | None = None
    reflex: str | None = None
    no_direction: bool = False
    difficulty: Annotated[int, Field(ge=1, le=5)] | None = None
    domain: str | None = None
    source: str | None = None
    # Set by ``dreamgen label``: where the labels came from, and two samples' agreement.
    provenance: LabelProvenance | None = None
    confidence: Annotated[float, Field(ge=0, le=1)] | None = None

    @property
    def decision_index(self) -> int:
        """Index of the decision turn in ``messages`` (always the last message)."""
        return len(self.messages) - 1

    @property
    def decision(self) -> LabelledMessage:
        """The decision turn: the user's last message."""
        return self.messages[-1]

    def _check_span(self, field: str, span: LabelledSpan, role: str) -> None:
        n = len(self.messages)
        if span.message >= n:
            raise _invariant(f"{field}.message", f"{span.message} is out of range ({n} messages)")
        msg = self.messages[span.message]
        if msg.role != role:
            what = "cues sit in user" if role == "user" else "distractors sit in assistant"
            raise _invariant(
                f"{field}.message",
                f"messages[{span.message}] is a {msg.role} message; {what} messages",
            )
        size = len(msg.content)
        if not span.start < span.end <= size:
            raise _invariant(
                f"{field}.end",
                f"[{span.start}:{span.end}] is not a span of messages[{span.message}] "
                f"(need 0 <= start < end <= {size})",
            )
        actual = msg.content[span.start : span.end]
        if span.text != actual:
            raise _invariant(
                f"{field}.text",
                f"{_short(span.text)} is not the text at "
                f"messages[{span.message}][{span.start}:{span.end}] ({_short(actual)})",
            )

    @model_validator(mode="after")
    def _invariants(self) -> Labelled:
        last = self.decision
        if last.role != "user":
            raise _invariant(
                f"messages.{self.decision_index}.role",
                f"the decision turn (the last message) must be a user message, not {last.role}",
            )
        if self.no_direction and self.cues:
            raise _invariant("cues", f"no_direction is true but there are {len(self.cues)} cue(s)")
        if not self.no_direction and not self.cues:
            raise _invariant("cues", "empty; at least one cue is needed unless no_direction")
        for i, cue in enumerate(self.cues):
            self._check_span(f"cues.{i}", cue, "user")
        for i, distractor in enumerate(self.distractors):
            self._check_span(f"distractors.{i}", distractor, "assistant")
        return self


class LabelledError(ValueError):
    """A bad labelled line: ``str(err)`` is one line, ``FILE:LINE: FIELD: DETAIL``."""

    def __init__(self, path: str, line: int, field: str, detail: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.detail = detail
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {field}: {detail}" if field else f"{where}: {detail}")


def _from_validation(path: str, line: int, exc: ValidationError) -> LabelledError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    ctx: dict[str, Any] = first.get("ctx") or {}
    if first["type"] == _ERROR_TYPE:
        field, detail = str(ctx["field"]), str(ctx["detail"])
    else:
        field = ".".join(str(part) for part in first["loc"]) or "(line)"
        detail = first["msg"]
    detail = " ".join(detail.split())
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return LabelledError(path, line, field, detail)


def parse_labelled(line: bytes | str, path: str = "<line>", number: int = 1) -> Labelled:
    """Parse and validate one JSONL line; a bad one raises a one-line ``LabelledError``."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise LabelledError(path, number, "", f"not JSON: {exc}") from None
    try:
        return Labelled.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(path, number, exc) from None


def iter_labelled(
    path: str | Path,
    errors: Literal["raise", "skip"] = "raise",
    on_error: Callable[[LabelledError], None] | None = None,
) -> Iterator[Labelled]:
    """Stream the labelled conversations of a JSONL file, skipping blank lines.

    With ``errors="raise"`` the first bad line raises ``LabelledError``; with
    ``errors="skip"`` a bad line is passed to ``on_error`` (if given) and skipped, so a
    caller can count or log them. A file that cannot be opened always raises.
    """
    name = str(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise LabelledError(name, 0, "", f"cannot read: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield parse_labelled(raw, name, number)
            except LabelledError as exc:
                if errors == "raise":
                    raise
                if on_error is not None:
                    on_error(exc)


def read_labelled(path: str | Path) -> Iterator[Labelled]:
    """Stream validated labelled conversations; the first bad line raises ``LabelledError``."""
    return iter_labelled(path, errors="raise")


def render_schema() -> bytes:
    """The JSON Schema of one labelled line, as checked in (sorted keys, 2-space indent)."""
    schema = Labelled.model_json_schema()
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write_schema(path: str | Path = SCHEMA_PATH) -> Path:
    """Write ``schemas/labelled.schema.json`` (or ``path``) from the model; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(render_schema())
    return target


if __name__ == "__main__":
    print(write_schema())
