"""Validate and label: raw model JSON → a Record with exact spans, or a named rejection.

Every way an answer can fail has a reason name, so a run's rejections can be counted
and read (``Rejected.reason``).
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

import orjson
from pydantic import ValidationError

from dreamgen import segments
from dreamgen.errors import first_error
from dreamgen.record import (
    Axes,
    Message,
    Provenance,
    Quality,
    Record,
    Sampling,
    Span,
    content_id,
    contrast_index,
)
from dreamgen.request import Request
from dreamgen.scenario import Scenario, UndirectedScenario
from dreamgen.spans import find_quote
from dreamgen.version import __version__


class Reason(StrEnum):
    """Why validate & label rejects an answer."""

    truncated = "truncated"  # finish_reason == "length": never parsed
    invalid_json = "invalid_json"
    schema = "schema"
    empty_cue = "empty_cue"
    cue_not_found = "cue_not_found"
    distractor_not_found = "distractor_not_found"
    bad_turn_index = "bad_turn_index"
    invariant = "invariant"
    identical_responses = "identical_responses"


class Rejected(Exception):
    """A model answer that cannot become a Record; ``reason`` is a stage's ``Reason``
    member (``dreamgen.stages.REASONS`` lists them all)."""

    def __init__(self, reason: StrEnum, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def parse(raw: str | bytes, schema_name: str = "scenario") -> Scenario:
    """Parse raw model output into the model-facing schema, or raise Rejected."""
    try:
        data = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise Rejected(Reason.invalid_json, str(exc)) from exc
    return _scenario(data, schema_name)


def _scenario(data: Any, schema_name: str) -> Scenario:
    """Decoded JSON into the model-facing schema, or raise Rejected."""
    model = UndirectedScenario if schema_name == "scenario_undirected" else Scenario
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Rejected(Reason.schema, f"{first_error(exc)} ({exc.error_count()} errors)") from exc
    except (RecursionError, ValueError) as exc:
        raise Rejected(Reason.schema, f"{type(exc).__name__}: {exc}") from exc


def label(
    scenario: Scenario,
    request: Request | None = None,
    *,
    model: str = "unknown",
    engine: str = "unknown",
    sampling: dict[str, Any] | None = None,
) -> Record:
    """Turn a parsed scenario into a Record with exact spans, or raise Rejected."""
    if not scenario.decision_turn.cue.strip():
        raise Rejected(Reason.empty_cue, "the decision turn's cue segment is blank")
    if not scenario.idea_turn.idea.strip():
        raise Rejected(Reason.distractor_not_found, "the idea turn's idea segment is blank")
    messages = [Message(role="user", content=scenario.opening)]
    for ex in scenario.exchanges:
        messages.append(Message(role="assistant", content=ex.assistant))
        messages.append(Message(role="user", content=ex.user))
    idea = scenario.idea_turn
    text, i0, i1 = segments.build(idea.before, idea.idea, idea.after)
    messages.append(Message(role="assistant", content=text))
    dec = scenario.decision_turn
    text, c0, c1 = segments.build(dec.before, dec.cue, dec.after)
    messages.append(Message(role="user", content=text))
    idea_index, decision_index = len(messages) - 2, len(messages) - 1

    if request is not None and request.axes is not None:
        axes = request.axes
        difficulty = request.difficulty or 1
    elif isinstance(scenario, UndirectedScenario):
        axes = Axes(
            cue_kind=dec.kind,
            distractor_kind=idea.kind,
            domain=scenario.domain,
            emotion=scenario.emotion,
            momentum=scenario.momentum,
        )
        difficulty = scenario.difficulty
    else:
        raise Rejected(Reason.schema, "a directed scenario needs its request's axes to be labelled")

    target = Message(role="assistant", content=scenario.listening.strip())
    contrast = Message(role="assistant", content=scenario.reflex.strip())
    cues = [
        Span(
            message=decision_index,
            start=c0,
            end=c1,
            kind=axes.cue_kind,
            text=messages[decision_index].content[c0:c1],
        )
    ]
    distractors = [
        Span(
            message=idea_index,
            start=i0,
            end=i1,
            kind=axes.distractor_kind,
            text=messages[idea_index].content[i0:i1],
        )
    ]
    cues += _quotes(scenario.extra_cues, messages, contrast, "user", Reason.cue_not_found)
    distractors += _quotes(
        scenario.extra_distractors, messages, contrast, "assistant", Reason.distractor_not_found
    )
    rid = content_id(messages, target, contrast)
    prov = Provenance(
        card=request.card if request else "unknown",
        prompt_hash=request.prompt_hash if request else "",
        model=model,
        engine=engine,
        sampling=Sampling.model_validate(
            {k: v for k, v in (sampling or {}).items() if k in Sampling.model_fields}
        ),
        dreamgen_version=__version__,
        created_at=round(time.time(), 3),
        operator=(request.operator if request else None) or "",
    )
    quality = Quality(
        model_cue_kind=dec.kind,
        model_distractor_kind=idea.kind,
        labels_agree=dec.kind == axes.cue_kind and idea.kind == axes.distractor_kind,
    )
    try:
        return Record(
            id=rid,
            messages=messages,
            target=target,
            contrast=contrast,
            cues=cues,
            distractors=distractors,
            axes=axes,
            difficulty=difficulty,
            group_id=(request.group_id if request else None) or rid,
            parent_id=(request.parent_id if request else None) or "",
            generation=request.generation if request else 0,
            mode=request.mode if request else "undirected",
            provenance=prov,
            quality=quality,
        )
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        reason = Reason.identical_responses if "identical" in msg else Reason.invariant
        raise Rejected(reason, msg) from exc


def _quotes(
    quotes: list[Any],
    messages: list[Message],
    contrast: Message,
    role: str,
    reason: Reason,
) -> list[Span]:
    spans: list[Span] = []
    after: dict[int, int] = {}
    for q in quotes:
        if q.turn == -1 and role == "assistant":
            index = contrast_index(len(messages))
            content = contrast.content
        elif 0 <= q.turn < len(messages) and messages[q.turn].role == role:
            index = q.turn
            content = messages[q.turn].content
        else:
            raise Rejected(Reason.bad_turn_index, f"turn {q.turn} is not a {role} turn")
        hit = find_quote(content, q.quote, after.get(index, 0))
        if hit is None:
            raise Rejected(reason, f"{q.quote[:60]!r} does not occur in turn {q.turn}")
        after[index] = hit[1]
        spans.append(
            Span(
                message=index, start=hit[0], end=hit[1], kind=q.kind, text=content[hit[0] : hit[1]]
            )
        )
    return spans


def validate(
    raw: str | bytes | dict[str, Any],
    request: Request | None = None,
    *,
    finish_reason: str = "stop",
    **provenance: Any,
) -> Record:
    """Validate raw model output (or an existing record) into a ``Record``.

    ``raw`` may be the model's JSON answer (a directed scenario needs its ``request`` for
    its axes; an undirected one labels itself) or a whole Record as JSON or a dict.
    Raises ``Rejected`` with a named ``reason`` and a readable message.
    """
    if finish_reason == "length":
        raise Rejected(Reason.truncated, "the answer hit max_tokens and was cut off")
    if isinstance(raw, dict):
        data: Any = raw
    else:
        try:
            data = orjson.loads(raw)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise Rejected(Reason.invalid_json, str(exc)) from exc
    # A whole Record only without a request: a model's answer to a request must be a
    # scenario, never a Record that brings its own labels and provenance.
    if (
        request is None
        and isinstance(data, dict)
        and "schema_version" in data
        and "messages" in data
    ):
        try:
            record = Record.model_validate(data)
            # It must survive the store's write and the reader's parse (nesting depth).
            Record.model_validate_json(orjson.dumps(record.model_dump(mode="json")))
        except ValidationError as exc:
            raise Rejected(Reason.schema, first_error(exc)) from exc
        except (ValueError, TypeError) as exc:  # nested too deep to serialise
            raise Rejected(Reason.schema, f"cannot be stored: {exc}") from exc
        return record
    schema = request.schema_name if request else "scenario_undirected"
    if request is None and isinstance(data, dict) and "domain" not in data:
        schema = "scenario"
    # Validate the decoded data directly: re-encoding it would cost time and fail (TypeError)
    # on nesting deeper than orjson.dumps allows (255) but orjson.loads accepts (1024).
    scenario = _scenario(data, schema)
    return label(scenario, request, **provenance)
