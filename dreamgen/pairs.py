"""Minimal pairs: variants of an accepted record that differ from it only at the cue.

A trainer or the probe compares attention with and without the direction, so the variant
must keep every other token where it was. Both variants are built by editing text, without
the LLM, and every label stays exact:

- ``cue_removed``: every cue span is cut out of its turn (the decision turn becomes its
  ``before`` + ``after``). No cue is left to label; target and contrast stay as they were,
  and ``quality.target_follows`` says the target now follows a direction that is gone.
- ``cue_contradicted``: the decision turn's cue is replaced by a phrase that turns the user
  toward the assistant's idea ("Actually, go with your idea."), labelled as the new cue;
  cues elsewhere are cut out. What was the reflex (it pushes the idea) becomes the target
  and the old listening reply the contrast. Distractor spans in the idea turn stay; those
  quoted from the old contrast are dropped (a distractor may not lie in the target).

Variants share the parent's ``group_id`` and split, carry ``parent_id`` = the parent's id,
``mode="minimal_pair"`` and ``minimal_pair`` = the variant; they count toward no quota.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import ValidationError

from dreamgen import segments
from dreamgen.record import Axes, Message, Record, Span, content_id
from dreamgen.taxonomy import CueKind

PairKind = Literal["cue_removed", "cue_contradicted"]
KINDS: tuple[PairKind, ...] = ("cue_removed", "cue_contradicted")

# Phrasings that reverse the direction toward the assistant's idea. Each stands alone as a
# sentence, so it reads after whatever the turn said before it.
CONTRADICTIONS: tuple[str, ...] = (
    "Actually, go with your idea instead.",
    "On second thought, do it your way.",
    "You know what, let's do what you suggested.",
    "Fine, you've convinced me, go with your suggestion.",
    "Okay, scratch that, your approach sounds better.",
)
CONTRADICTED_KIND = CueKind.explicit_instruction


def selected(record: Record, share: float) -> bool:
    """Whether ``record`` gets minimal pairs at this share: by its id, stable across runs."""
    if share <= 0 or record.mode == "minimal_pair":
        return False
    u = int(hashlib.sha256(f"pair:{record.id}".encode()).hexdigest()[:12], 16) / 16**12
    return u < share


def derive(record: Record, kinds: Sequence[PairKind] = KINDS) -> list[Record]:
    """The minimal-pair variants of ``record`` (fewer when one cannot be built cleanly)."""
    if record.mode == "minimal_pair":
        return []
    dec = len(record.messages) - 1
    primary = next((c for c in record.cues if c.message == dec), None)
    if primary is None:
        return []
    out: list[Record] = []
    for kind in kinds:
        variant = _removed(record) if kind == "cue_removed" else _contradicted(record, primary)
        if variant is not None:
            out.append(variant)
    return out


def _removed(record: Record) -> Record | None:
    by_msg: dict[int, list[Span]] = {}
    for c in record.cues:
        by_msg.setdefault(c.message, []).append(c)
    messages = [
        Message(
            role=m.role, content=segments.cut(m.content, by_msg[i]) if i in by_msg else m.content
        )
        for i, m in enumerate(record.messages)
    ]
    if len(messages[-1].content.strip()) < 2:
        return None  # the cue was the whole turn: nothing is left to say
    return _make(
        record,
        "cue_removed",
        messages,
        target=record.target,
        contrast=record.contrast,
        cues=[],
        distractors=record.distractors,
        quality={"target_follows": "removed_direction"},
    )


def _contradicted(record: Record, primary: Span) -> Record | None:
    dec = len(record.messages) - 1
    phrase = CONTRADICTIONS[
        int(hashlib.sha256(record.id.encode()).hexdigest()[:8], 16) % len(CONTRADICTIONS)
    ]
    messages: list[Message] = []
    cue: Span | None = None
    for i, m in enumerate(record.messages):
        others = [c for c in record.cues if c.message == i and c is not primary]
        if i != dec:
            content = segments.cut(m.content, others) if others else m.content
            messages.append(Message(role=m.role, content=content))
            continue
        # Cut other cues in the decision turn first, tracking where the primary moves.
        text, start, end = m.content, primary.start, primary.end
        for o in sorted(others, key=lambda s: s.start, reverse=True):
            cut = segments.cut(text, [o])
            if o.start < start:
                shift = len(text) - len(cut)
                start, end = start - shift, end - shift
            text = cut
        content, s0, s1 = segments.replace(text, start, end, phrase)
        messages.append(Message(role=m.role, content=content))
        cue = Span(message=dec, start=s0, end=s1, kind=CONTRADICTED_KIND, text=phrase)
    assert cue is not None
    # Target and contrast swap below: keep only distractors in the context messages.
    distractors = [d for d in record.distractors if not record.is_response(d.message)]
    axes = record.axes.model_copy(update={"cue_kind": CONTRADICTED_KIND})
    return _make(
        record,
        "cue_contradicted",
        messages,
        target=record.contrast,
        contrast=record.target,
        cues=[cue],
        distractors=distractors,
        quality={"target_follows": "assistant_idea", "replaced_cue": primary.text},
        axes=axes,
    )


def _make(
    parent: Record,
    kind: PairKind,
    messages: list[Message],
    *,
    target: Message,
    contrast: Message,
    cues: list[Span],
    distractors: list[Span],
    quality: dict[str, str],
    axes: Axes | None = None,
) -> Record | None:
    prov = parent.provenance.model_copy(
        update={"operator": kind, "created_at": round(time.time(), 3)}
    )
    try:
        return Record(
            id=content_id(messages, target, contrast),
            messages=messages,
            target=target,
            contrast=contrast,
            cues=cues,
            distractors=distractors,
            axes=axes or parent.axes,
            difficulty=parent.difficulty,
            split=parent.split,
            group_id=parent.group_id,
            parent_id=parent.id,
            generation=parent.generation,
            mode="minimal_pair",
            minimal_pair=kind,
            provenance=prov,
            quality=parent.quality.model_copy(
                update={"pair_of": parent.id, "variant": kind, **quality}
            ),
        )
    except ValidationError:
        return None  # e.g. an edit left the turn unreadable to the validator: skip it
