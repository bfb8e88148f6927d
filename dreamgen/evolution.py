"""Evolution: how an accepted scenario is rewritten into a child (the dream loop).

The planner decides *when* to evolve and toward which cell; this module holds what the
child is asked for: the operators (their texts are part of the prompt, so of the data
fingerprint), the choice of operator for a parent and a target cell, and the parent shown
in the JSON shape the model writes.
"""

from __future__ import annotations

import random

import orjson

from dreamgen import segments
from dreamgen.record import Record
from dreamgen.request import Cell
from dreamgen.taxonomy import Domain

OPERATORS: dict[str, str] = {
    "subtler_cue": "make the user's direction subtler: shorter, less explicit, easier to miss, "
    "but still clear to a careful reader.",
    "stronger_distractor": "make the assistant's idea more tempting: a real benefit, a concrete "
    "reason, argued with confidence.",
    "add_emotion": "give the user a clear emotional undercurrent that adds pressure.",
    "reverse_momentum": "make the earlier exchanges head the opposite way from the direction, "
    "so the direction has to turn the conversation.",
    "move_domain": "move the whole situation to the setting below, keeping its shape: same kind "
    "of direction, same kind of temptation, new people and details.",
    "lengthen_context": "add an earlier exchange, so more talk sits between the start and the "
    "direction.",
    "change_cue_kind": "carry the direction in the way named below instead.",
}


def pick(rng: random.Random, parent: Record, cell: Cell) -> tuple[str, str]:
    """The operator that moves ``parent`` toward ``cell``, and the child's domain. A harder
    cell: a subtler step; another cue kind: change it; the same cell: a sideways rewrite."""
    cue, _, d = cell
    if d > parent.difficulty:
        op = rng.choice(["subtler_cue", "stronger_distractor", "lengthen_context"])
    elif cue != parent.axes.cue_kind:
        op = "change_cue_kind"
    else:
        op = rng.choice(["add_emotion", "reverse_momentum", "move_domain"])
    if op == "move_domain":
        return op, rng.choice([x for x in Domain if x != parent.axes.domain])
    return op, parent.axes.domain


def parent_text(parent: Record) -> str:
    """The parent in the same JSON shape the model writes, so the rewrite stays in format.

    The segments come back from the record's exact spans: the idea is the first distractor
    in the idea turn, the cue the first cue in the decision turn. A record that does not
    have that shape (hand-labelled data) is shown as plain turns instead.
    """
    msgs = parent.messages
    idea_i, dec_i = len(msgs) - 2, len(msgs) - 1
    idea = next((d for d in parent.distractors if d.message == idea_i), None)
    cue = next((c for c in parent.cues if c.message == dec_i), None)
    roles = [m.role for m in msgs]
    shape = ["user"] + ["assistant", "user"] * ((len(msgs) - 1) // 2)
    if idea is None or cue is None or roles != shape or len(msgs) < 3:
        lines = [f"{m.role}: {m.content}" for m in msgs]
        lines.append(f"assistant: {parent.target.content}")
        return "\n".join(lines)
    i_before, _, i_after = segments.split(msgs[idea_i].content, idea.start, idea.end)
    d_before, _, d_after = segments.split(msgs[dec_i].content, cue.start, cue.end)
    data = {
        "opening": msgs[0].content,
        "exchanges": [
            {"assistant": msgs[i].content, "user": msgs[i + 1].content} for i in range(1, idea_i, 2)
        ],
        "idea_turn": {
            "before": i_before,
            "idea": idea.text,
            "after": i_after,
            "kind": idea.kind,
        },
        "decision_turn": {
            "before": d_before,
            "cue": cue.text,
            "after": d_after,
            "kind": cue.kind,
        },
        "listening": parent.target.content,
        "reflex": parent.contrast.content,
    }
    return orjson.dumps(data).decode()
