"""A planned model call: the contract between the planner, the engines and validate.

The planner makes a ``Request``; an engine sends its ``messages`` with the schema named by
``schema_name``; ``validate`` turns the answer into a Record labelled with the request's
axes and lineage. It lives apart from the planner so that validate (and a Ray worker, or a
trainer replaying answers) can use it without importing how requests are chosen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from dreamgen.record import Axes, Mode

Cell = tuple[str, str, int]  # (cue_kind, distractor_kind, difficulty)
SchemaName = Literal["scenario", "scenario_undirected"]


class Request(BaseModel):
    """One planned model call and everything needed to turn its answer into a Record."""

    model_config = ConfigDict(extra="forbid")

    index: int
    card: str
    mode: Mode
    schema_name: SchemaName
    axes: Axes | None  # None when the model chooses (undirected)
    difficulty: int | None
    cell: Cell | None
    group_id: str | None = None
    parent_id: str | None = None
    generation: int = 0
    operator: str | None = None
    # The worked example the system prompt showed (``CardSet.examples_by_id`` key; "": none),
    # so the copy filter (``dreamgen.copies``) compares the answer with what was shown.
    example: str = ""
    messages: list[dict[str, str]]
    prompt_hash: str
