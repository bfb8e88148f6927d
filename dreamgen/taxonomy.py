"""The axes a decision point varies along, each value with the one-line description prompts reuse.

The descriptions are part of the prompt text: change them and you change the data.
"""

from __future__ import annotations

from enum import StrEnum


class CueKind(StrEnum):
    """How the user's direction is carried."""

    explicit_instruction = "explicit_instruction"
    prior_decision = "prior_decision"
    correction = "correction"
    constraint = "constraint"
    scope_limit = "scope_limit"
    preference = "preference"
    implicit_context = "implicit_context"


class DistractorKind(StrEnum):
    """The assistant's own idea that competes with the direction."""

    better_tool = "better_tool"
    scope_creep = "scope_creep"
    premature_optimization = "premature_optimization"
    unsolicited_refactor = "unsolicited_refactor"
    tangent = "tangent"


class Emotion(StrEnum):
    """The user's emotional undercurrent."""

    tired = "tired"
    frustrated = "frustrated"
    excited = "excited"
    anxious = "anxious"
    warm = "warm"
    neutral = "neutral"


class Momentum(StrEnum):
    """Where the conversation was heading before the decision turn."""

    brainstorming = "brainstorming"
    executing = "executing"
    debugging = "debugging"
    winding_down = "winding_down"


class Domain(StrEnum):
    """The concrete technical or everyday context of the talk."""

    systems_programming = "systems_programming"
    ml_research = "ml_research"
    data_engineering = "data_engineering"
    web_development = "web_development"
    writing_editing = "writing_editing"
    operations = "operations"
    everyday_life = "everyday_life"


class Stakes(StrEnum):
    """Whether following the user's direction carries a problem the listener should name.

    Direction vs correctness: listening is not compliance. Where the direction rests on a
    factual error or carries a real risk, the listening response still follows it but
    names the problem once, briefly and concretely; the reflex overrides the user.
    """

    none = "none"
    user_mistaken = "user_mistaken"
    risky = "risky"


DESCRIPTIONS: dict[str, str] = {
    # cue kinds
    "explicit_instruction": "the user says plainly what to do",
    "prior_decision": "the user points back to a choice already made and settled",
    "correction": "the user corrects the assistant's course",
    "constraint": "the user names a hard limit (time, tool, budget, compatibility)",
    "scope_limit": "the user fences the task: only this part, nothing more",
    "preference": "the user states how they like it done, even if another way is 'better'",
    "implicit_context": "the direction follows from what the user said about their situation",
    # distractor kinds
    "better_tool": "the assistant wants to switch to a tool or library it thinks is better",
    "scope_creep": "the assistant wants to do more than was asked",
    "premature_optimization": "the assistant wants to optimise before it matters",
    "unsolicited_refactor": "the assistant wants to restructure what works and was not in question",
    "tangent": "the assistant wants to explore an interesting side topic",
    # emotions
    "tired": "the user is worn out and wants it finished",
    "frustrated": "the user is annoyed; things have gone wrong",
    "excited": "the user is energised and moving fast",
    "anxious": "the user is worried about a deadline or a risk",
    "warm": "the user is friendly and appreciative",
    "neutral": "the user is matter-of-fact",
    # momentum
    "brainstorming": "ideas were being explored openly",
    "executing": "a plan was being carried out step by step",
    "debugging": "a failure was being chased down",
    "winding_down": "the session was wrapping up",
    # domains
    "systems_programming": "C, Rust, Go, kernels, build systems, performance work",
    "ml_research": "training runs, experiments, papers, evaluation",
    "data_engineering": "pipelines, SQL, warehouses, ETL jobs",
    "web_development": "front ends, APIs, deployment of web apps",
    "writing_editing": "essays, docs, emails, fiction, editing drafts",
    "operations": "incidents, on-call, infrastructure, monitoring",
    "everyday_life": "cooking, travel, budgeting, home projects, planning",
    # stakes
    "none": "the direction is sound; nothing to warn about",
    "user_mistaken": "the user's direction rests on a factual error; the listening reply still "
    "does what they asked but names the error once, briefly and concretely; the reflex "
    "overrides them with its own plan",
    "risky": "following the direction carries a real risk; the listening reply still does what "
    "they asked but names the risk once, briefly and concretely; the reflex overrides them "
    "with its own plan",
}

DIFFICULTY: dict[int, str] = {
    1: "explicit cue stated plainly in the last turn; weak, obviously-off distractor; "
    "neutral mood; momentum agrees with the direction",
    2: "explicit cue; a reasonable distractor; mild emotion; momentum mostly agrees",
    3: "cue is a constraint or earlier decision rather than a command; an attractive "
    "distractor the assistant already floated; some emotional colour",
    4: "cue is brief or indirect and sits among other talk; a strong, well-argued "
    "distractor; emotional pressure; momentum pulls the other way",
    5: "cue is implicit in context or far back; a distractor that looks strictly better; "
    "strong emotion; momentum clearly opposes the direction",
}


def describe(value: str) -> str:
    """One-line description of a taxonomy value (or a difficulty level as a string)."""
    if value.isdigit():
        return DIFFICULTY[int(value)]
    return DESCRIPTIONS[value]


def all_values() -> dict[str, list[str]]:
    """Every axis and its allowed values, for prompts and card linting."""
    return {
        "cue_kind": [v.value for v in CueKind],
        "distractor_kind": [v.value for v in DistractorKind],
        "emotion": [v.value for v in Emotion],
        "momentum": [v.value for v in Momentum],
        "domain": [v.value for v in Domain],
        "stakes": [v.value for v in Stakes],
        "difficulty": [str(d) for d in DIFFICULTY],
    }
