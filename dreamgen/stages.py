"""The record path as a chain of stages: validate & label → filter → copies → split → dedup
→ pairs → store.

Each stage is a small object with one method, ``process(item) -> Outcome``: the item is
kept (the stage may have filled in part of it), or rejected with a reason the stage owns
(a member of its ``reasons`` enum). The pipeline runs the chain on every answer; the
daemon and library callers go through the pipeline; the bench times this same chain,
stage by stage (``Chain(timed=True)``). A new stage (a judge, a copy filter) is one class
here and one place in ``chain_for``.

Stages are synchronous and cheap (≪ 1 ms per record on one core, DESIGN.md): they run on
the event loop between network waits.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from datasketch import MinHash

from dreamgen import copies, dedup, filters, judge, pairs
from dreamgen.copies import CopyIndex
from dreamgen.dedup import Dedup, conversation_text
from dreamgen.pairs import PairKind
from dreamgen.record import Record, Split, split_for
from dreamgen.request import Request
from dreamgen.store import Store
from dreamgen.validate import Reason as ValidateReason
from dreamgen.validate import Rejected, validate

if TYPE_CHECKING:  # the record path needs no engine code at import (aiohttp is heavy)
    from dreamgen.engines.base import Completion, Engine


class RunReason(StrEnum):
    """Rejections that the run itself owns (no stage saw the answer)."""

    engine_error = "engine_error"  # the engine gave no answer (retries exhausted)


class StoreReason(StrEnum):
    """Why the store stage does not keep a record."""

    duplicate = "duplicate"  # the store already holds this id
    surplus = "surplus"  # the target is met by records already accepted: dropped, not counted


# Every reason a record can be rejected with, by stage (for docs, tests and dashboards).
REASONS: tuple[str, ...] = tuple(
    dict.fromkeys(
        r.value
        for enum in (
            ValidateReason,
            filters.Reason,
            copies.Reason,
            judge.Reason,
            dedup.Reason,
            StoreReason,
            RunReason,
        )
        for r in enum
        if r is not StoreReason.surplus
    )
)


@dataclass(slots=True)
class Item:
    """One model answer on its way through the chain; stages fill in the later fields."""

    request: Request
    content: str
    finish_reason: str = "stop"
    completion_tokens: int = 0
    model: str = "unknown"
    engine: str = "unknown"
    sampling: dict[str, Any] = field(default_factory=dict)
    record: Record | None = None  # set by Label
    signature: tuple[bytes, MinHash] | None = None  # set by DedupCheck
    pairs: list[Record] = field(default_factory=list)  # set by Pairs

    @classmethod
    def answered(
        cls, request: Request, completion: Completion, engine: Engine, sampling: dict[str, Any]
    ) -> Item:
        """The item for ``engine``'s ``completion`` of ``request``."""
        return cls(
            request,
            completion.content,
            finish_reason=completion.finish_reason,
            completion_tokens=completion.completion_tokens,
            model=engine.model,
            engine=engine.name,
            sampling=sampling,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a stage decided: kept (``reason is None``) or rejected with a named reason."""

    reason: StrEnum | None = None
    message: str = ""

    @property
    def kept(self) -> bool:
        return self.reason is None


KEPT = Outcome()


class Stage(ABC):
    """One step of the record path."""

    name: ClassVar[str]
    reasons: ClassVar[type[StrEnum] | None] = None  # None: this stage never rejects

    @abstractmethod
    def process(self, item: Item) -> Outcome:
        """Keep ``item`` (possibly filling in its fields) or reject it with a reason."""


def _record(item: Item) -> Record:
    # Stages after Label rely on it; a chain built in the wrong order fails loudly here.
    assert item.record is not None, "stage order: Label must run first"
    return item.record


class Label(Stage):
    """Validate & label: the raw answer → a Record with exact spans (``dreamgen.validate``)."""

    name = "label"
    reasons = ValidateReason

    def process(self, item: Item) -> Outcome:
        try:
            item.record = validate(
                item.content,
                item.request,
                finish_reason=item.finish_reason,
                model=item.model,
                engine=item.engine,
                sampling=item.sampling,
            )
        except Rejected as rej:
            return Outcome(rej.reason, rej.message)
        return KEPT


class Filter(Stage):
    """Rule filters: placeholders, echoes of the prompt, boilerplate (``dreamgen.filters``)."""

    name = "filter"
    reasons = filters.Reason

    def process(self, item: Item) -> Outcome:
        try:
            filters.check(_record(item))
        except Rejected as rej:
            return Outcome(rej.reason, rej.message)
        return KEPT


class CopyCheck(Stage):
    """Reject a record copied from what its prompt showed (``dreamgen.copies``); the share
    it measured goes to ``quality.copy_share`` either way."""

    name = "copies"
    reasons = copies.Reason

    def __init__(self, index: CopyIndex) -> None:
        self.index = index

    def process(self, item: Item) -> Outcome:
        record = _record(item)
        share, part = self.index.measure(record, item.request)
        record.quality.copy_share = round(share, 4)
        if share > self.index.config.max_share:
            source = self.index.explain(record, item.request, part)
            n = self.index.config.ngram
            return Outcome(
                copies.Reason.copied_prompt,
                f"the {part} shares {share:.0%} of its word {n}-grams with {source}",
            )
        return KEPT


class AssignSplit(Stage):
    """The record's split, by group, so a scenario and its evolutions never straddle splits."""

    name = "split"

    def __init__(self, ratios: Mapping[Split, float]) -> None:
        self.ratios = ratios

    def process(self, item: Item) -> Outcome:
        record = _record(item)
        record.split = split_for(record.group_id, self.ratios)
        return KEPT


class DedupCheck(Stage):
    """Exact and near-duplicate check against everything accepted (and held-out data)."""

    name = "dedup"
    reasons = dedup.Reason

    def __init__(self, index: Dedup) -> None:
        self.index = index

    def process(self, item: Item) -> Outcome:
        record = _record(item)
        key, mh = self.index.signature(conversation_text(record))
        reason = self.index.check(key, mh, record)
        if reason is not None:
            return Outcome(reason, "seen before")
        item.signature = (key, mh)
        return KEPT


class Pairs(Stage):
    """Minimal-pair variants of a record chosen by id (``dreamgen.pairs``); never rejects."""

    name = "pairs"

    def __init__(self, share: float, kinds: Sequence[PairKind]) -> None:
        self.share, self.kinds = share, kinds

    def process(self, item: Item) -> Outcome:
        record = _record(item)
        if pairs.selected(record, self.share):
            item.pairs = pairs.derive(record, self.kinds)
        return KEPT


class Keep(Stage):
    """Hand the record (and its pairs) to the store and its signature to dedup.

    Reported accepted only later, once the store has fsynced it (the pipeline's flush).
    ``full(record)`` says the target has no room left for it (met, or its mode's share of
    it met): the record is then dropped as surplus, not counted.
    """

    name = "store"
    reasons = StoreReason

    def __init__(self, store: Store, index: Dedup, full: Callable[[Record], bool]) -> None:
        self.store, self.index, self.full = store, index, full

    def process(self, item: Item) -> Outcome:
        record = _record(item)
        if self.full(record):
            return Outcome(StoreReason.surplus, "the target has no room left for it")
        if item.signature is not None:
            self.index.add(*item.signature)
        if not self.store.add(record):
            return Outcome(StoreReason.duplicate, "already in the store")
        for pair in item.pairs:
            self.store.add(pair)
        return KEPT


@dataclass(slots=True)
class StageTime:
    """What one stage saw, when the chain is timed."""

    n: int = 0
    rejected: int = 0
    cpu_ns: int = 0


class Chain:
    """Stages run in order; the first rejection ends an item's way through."""

    def __init__(self, stages: Sequence[Stage], *, timed: bool = False) -> None:
        self.stages = list(stages)
        self.timed = timed
        self.times: dict[str, StageTime] = {s.name: StageTime() for s in self.stages}

    def process(self, item: Item, *, start: str | None = None, stop: str | None = None) -> Outcome:
        """Run the stages from the one named ``start`` up to (not including) ``stop``."""
        stages = self._between(start, stop)
        if self.timed:
            return self._timed(item, stages)
        for stage in stages:
            outcome = stage.process(item)
            if outcome.reason is not None:
                return outcome
        return KEPT

    def _between(self, start: str | None, stop: str | None) -> list[Stage]:
        if start is None and stop is None:
            return self.stages
        names = [s.name for s in self.stages]
        lo = 0 if start is None else names.index(start)
        return self.stages[lo : len(names) if stop is None else names.index(stop)]

    def _timed(self, item: Item, stages: Sequence[Stage]) -> Outcome:
        clock = time.thread_time_ns  # CPU of this thread: what the stage costs, not the wait
        for stage in stages:
            t = self.times[stage.name]
            c0 = clock()
            outcome = stage.process(item)
            t.cpu_ns += clock() - c0
            t.n += 1
            if outcome.reason is not None:
                t.rejected += 1
                return outcome
        return KEPT


# The async judge (``dreamgen.judge``) runs between the chain's two parts, just before
# this stage. Before dedup, not after: a record must meet a near-duplicate judged at the
# same time in the index, so DedupCheck and Keep stay back to back, with no await between.
JUDGE_BEFORE = "dedup"


def chain_for(
    *,
    splits: Mapping[Split, float],
    index: Dedup,
    store: Store,
    full: Callable[[Record], bool],
    copy_index: CopyIndex,
    pair_share: float = 0.0,
    pair_kinds: Sequence[PairKind] = pairs.KINDS,
    timed: bool = False,
) -> Chain:
    """The record path every run uses."""
    return Chain(
        [
            Label(),
            Filter(),
            CopyCheck(copy_index),
            AssignSplit(splits),
            DedupCheck(index),
            Pairs(pair_share, pair_kinds),
            Keep(store, index, full),
        ],
        timed=timed,
    )
