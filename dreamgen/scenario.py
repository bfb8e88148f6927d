"""The model-facing schemas: what the LLM is asked to write, under guided decoding.

Spans are grounded by construction wherever we can: the assistant turn that floats
its own idea and the user's decision turn are written as segments, and the message
text is their concatenation, so the labelled span is exact without any search.
(DESIGN.md: SmolLM2 quoted its own cue verbatim 0/12 times; segments gave 12/12.)
Quotes with a turn index remain for extra cues and distractors elsewhere.

Every string carries ``maxLength`` and every list ``maxItems`` so guided decoding
cannot run away.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum

Short = Annotated[str, Field(max_length=200)]
Turn = Annotated[str, Field(min_length=1, max_length=400)]
Reply = Annotated[str, Field(min_length=20, max_length=600)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class Exchange(_Model):
    """An earlier assistant reply and the user's answer to it."""

    assistant: Turn
    user: Turn


class IdeaTurn(_Model):
    """The assistant turn where it floats its own competing idea (the distractor)."""

    before: Short
    idea: Annotated[str, Field(min_length=3, max_length=200)]
    after: Short
    kind: DistractorKind


class DecisionTurn(_Model):
    """The user's last turn, which carries the direction cue."""

    before: Short
    cue: Annotated[str, Field(min_length=3, max_length=200)]
    after: Short
    kind: CueKind


class CueQuote(_Model):
    """A further direction cue quoted verbatim from an earlier user turn."""

    turn: Annotated[int, Field(ge=0, le=7)]
    quote: Annotated[str, Field(min_length=1, max_length=200)]
    kind: CueKind


class DistractorQuote(_Model):
    """A further distractor quoted verbatim from an assistant turn (turn = -1: the reflex reply)."""

    turn: Annotated[int, Field(ge=-1, le=7)]
    quote: Annotated[str, Field(min_length=1, max_length=200)]
    kind: DistractorKind


class Scenario(_Model):
    """A directed scenario: the planner fixed the axes, the model writes the conversation.

    The messages are: ``opening`` (user), then each exchange (assistant, user), then the
    idea turn (assistant), then the decision turn (user). Roles alternate by construction;
    quote ``turn`` indices count messages in that order from 0.
    """

    opening: Turn
    exchanges: Annotated[list[Exchange], Field(max_length=2)] = []
    idea_turn: IdeaTurn
    decision_turn: DecisionTurn
    extra_cues: Annotated[list[CueQuote], Field(max_length=2)] = []
    extra_distractors: Annotated[list[DistractorQuote], Field(max_length=2)] = []
    listening: Reply
    reflex: Reply


class UndirectedScenario(Scenario):
    """An undirected scenario: the model also chooses and labels the situation's axes."""

    domain: Domain
    emotion: Emotion
    momentum: Momentum
    difficulty: Annotated[int, Field(ge=1, le=5)]


SCHEMAS: dict[str, type[BaseModel]] = {
    "scenario": Scenario,
    "scenario_undirected": UndirectedScenario,
}


Dialect = Literal["bounded", "unbounded"]
# String bounds that make a grammar engine count characters. vLLM's xgrammar decodes far
# slower with them (xgrammar #852; measured in bench/xgrammar_schemas.py), so vLLM gets the
# schema without them and the bounds are enforced after, by pydantic (and by max_tokens);
# llama.cpp keeps them: the 135M model rambles without a hard stop.
_LENGTH_KEYS = ("maxLength", "minLength")


def _unbounded(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _unbounded(v) for k, v in node.items() if k not in _LENGTH_KEYS}
    if isinstance(node, list):
        return [_unbounded(v) for v in node]
    return node


def schema_for(name: str, dialect: Dialect = "bounded") -> dict[str, Any]:
    """The JSON Schema of a model-facing schema in one rendering (one source, two forms)."""
    schema = SCHEMAS[name].model_json_schema()
    return schema if dialect == "bounded" else _unbounded(schema)


def response_format(name: str, dialect: Dialect = "bounded") -> dict[str, Any]:
    """The OpenAI ``response_format`` for one of the fixed model-facing schemas.

    Built once per schema and dialect and reused for every request: vLLM and llama.cpp
    cache the compiled grammar per schema, and a new schema per request stalls the engine.
    """
    return _RESPONSE_FORMATS[dialect][name]


_RESPONSE_FORMATS: dict[str, dict[str, dict[str, Any]]] = {
    dialect: {
        name: {
            "type": "json_schema",
            "json_schema": {"name": name, "strict": True, "schema": schema_for(name, dialect)},
        }
        for name in SCHEMAS
    }
    for dialect in ("bounded", "unbounded")
}
