"""``dreamgen label``: label conversations we did not generate, resumably.

Reads the input as a stream (``dreamgen.conversations``), finds decision points
(``dreamgen.labeller``), labels each with the rules or an LLM engine, and writes
``Labelled`` lines through ``LabelOutput`` (exactly once over the input, SIGKILL-safe).

With an LLM engine each conversation holds one slot of the same in-flight window a build
uses (the engine's ``gate``, else ``concurrency``) while its requests run, so the reader
never runs ahead of the engine. Each decision point is asked ``samples`` times (different
seeds); the first valid answer is the label and the agreement of two is its confidence.
An engine failure (after the engine's own retries) stops the run with one clear line;
the conversations it was working on stay undone, and the next run does them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson

from dreamgen.config import Config
from dreamgen.conversations import BadInput, Conversation, Format, InputError, read_conversations
from dreamgen.engines import Engine, EngineError, Gate, open_engine
from dreamgen.label_out import LabelOutput
from dreamgen.labelled import Labelled
from dreamgen.labeller import (
    CUE_RULES,
    DISTRACTOR_RULES,
    AnswerError,
    Labels,
    Point,
    Span,
    agreement,
    decision_turns,
    parse_answer,
    point_at,
    prompt_hash,
    prompt_messages,
    response_format,
    rules_labels,
)
from dreamgen.version import __version__

log = logging.getLogger("dreamgen.label")

ENGINES = ("rules", "embedded", "openai")
FORMATS: tuple[Format, ...] = ("auto", "openai", "sharegpt")
RULES_MODEL = "rules-v1"
ANSWER_MAX_TOKENS = 400  # an answer names a few ids: anything longer is rambling


def rules_hash() -> str:
    """Hash of the rules themselves (their provenance ``prompt_hash``)."""
    patterns = [p.pattern for _, p in CUE_RULES] + [p.pattern for _, p in DISTRACTOR_RULES]
    return hashlib.sha256(orjson.dumps(patterns)).hexdigest()[:16]


@dataclass
class LabelJob:
    """What one ``dreamgen label`` run does."""

    input: Path
    out: Path
    engine: str = "rules"  # one of ENGINES
    config: Config = field(default_factory=Config)  # servers, model, sampling, concurrency
    column: str | None = None
    fmt: str = "auto"  # one of FORMATS
    all_turns: bool = False
    samples: int = 2
    flush_items: int = 512
    flush_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {self.fmt!r}")
        if self.samples < 1:
            raise ValueError(f"--samples must be at least 1, not {self.samples}")
        if self.engine != "rules" and self.config.engine != self.engine:
            raise ValueError(f"the config's engine is {self.config.engine!r}, not {self.engine!r}")

    def run_key(self) -> dict[str, Any]:
        """What shapes the output: resuming OUT with anything else is refused."""
        llm = self.engine != "rules"
        return {
            "input": str(self.input.resolve()),
            "engine": self.engine,
            "model": self.config.model_name if llm else RULES_MODEL,
            "prompt_hash": prompt_hash() if llm else rules_hash(),
            "column": self.column,
            "format": self.fmt,
            "all_turns": self.all_turns,
            "samples": self.samples if llm else 1,
        }


@dataclass
class LabelSummary:
    """Counts over the whole OUT (earlier runs included) plus this run's time."""

    totals: Counter[str]
    rejected: Counter[str]
    done: int = 0  # input items made durable by this run
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    stopped_by: str = "end"

    def as_dict(self) -> dict[str, Any]:
        elapsed = max((self.finished or time.monotonic()) - self.started, 1e-9)
        return {
            "totals": dict(sorted(self.totals.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "done_this_run": self.done,
            "elapsed_s": round(elapsed, 2),
            "conversations_per_s": round(self.done / elapsed, 1),
            "stopped_by": self.stopped_by,
        }


def _hash(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value)).hexdigest()[:16]


def labelled_line(
    job: LabelJob,
    conv: Conversation,
    turn: int,
    point: Point,
    labels: Labels,
    prov: dict[str, Any],
    confidence: float | None,
) -> bytes:
    """One validated ``Labelled`` JSONL line (no newline) for a labelled decision point."""
    group = conv.source_id or _hash(conv.messages)

    def spans(found: list[Span]) -> list[dict[str, Any]]:
        # The text is cut from the offsets: a span's text is at its offsets by construction.
        return [
            {
                "message": s.message,
                "start": s.start,
                "end": s.end,
                "kind": s.kind,
                "text": point.messages[s.message]["content"][s.start : s.end],
            }
            for s in found
        ]

    item = Labelled.model_validate(
        {
            "id": f"{group}#{turn}" if job.all_turns else group,
            "group_id": group,
            "messages": point.messages,
            "cues": spans(labels.cues),
            "distractors": spans(labels.distractors),
            "no_direction": labels.no_direction,
            "provenance": {**prov, "input_index": conv.index, "turn": turn},
            "confidence": confidence,
        }
    )
    return item.model_dump_json(exclude_none=True).encode()


def _reject(
    conv: Conversation | BadInput, reason: str, detail: str, turn: int | None = None
) -> dict[str, Any]:
    return {
        "input_index": conv.index,
        "where": conv.where,
        "turn": turn,
        "reason": reason,
        "detail": detail,
    }


def _counts(labels: list[Labels]) -> Counter[str]:
    c: Counter[str] = Counter()
    for lab in labels:
        c["labelled"] += 1
        c["no_direction"] += lab.no_direction
        c["cues"] += len(lab.cues)
        c["distractors"] += len(lab.distractors)
        for reason, n in lab.dropped.items():
            c[f"dropped_{reason}"] += n
    return c


class LabelRun:
    """One run of ``dreamgen label`` over one OUT folder."""

    def __init__(self, job: LabelJob, on_bad: Callable[[BadInput], Any] | None = None) -> None:
        self.job = job
        self.on_bad = on_bad
        self.output = LabelOutput(job.out, job.run_key())
        self.summary = LabelSummary(Counter(self.output.totals), Counter(self.output.rejected))
        self.stop_event = asyncio.Event()
        self.fatal: EngineError | None = None
        self._last_flush = time.monotonic()
        key = job.run_key()
        self._prov = {
            "labeller": "rules" if job.engine == "rules" else "llm",
            "engine": job.engine,
            "model": key["model"],
            "prompt_hash": key["prompt_hash"],
            "input": str(job.input),
            "samples": key["samples"],
            "dreamgen_version": __version__,
        }

    def stop(self, reason: str = "signal") -> None:
        """Read no further; what is in flight finishes and is written."""
        self.summary.stopped_by = reason
        self.stop_event.set()

    def _flush(self, force: bool = False) -> None:
        out = self.output
        now = time.monotonic()
        due = now - self._last_flush >= self.job.flush_interval_s
        if force or out.buffered >= self.job.flush_items or (due and out.buffered):
            self.summary.done += out.flush()
            self._last_flush = now
            self.summary.totals = Counter(out.totals)
            self.summary.rejected = Counter(out.rejected)

    def _bad(self, item: BadInput) -> None:
        self.output.finish(item.index, [], [_reject(item, "malformed_input", item.detail)])
        if self.on_bad is not None:
            self.on_bad(item)

    def _rules(self, conv: Conversation) -> None:
        turns = decision_turns(conv.messages, self.job.all_turns)
        if not turns:
            reject = _reject(conv, "no_decision_point", "no user turn follows an assistant turn")
            self.output.finish(conv.index, [], [reject])
            return
        lines, found = [], []
        for turn in turns:
            point = point_at(conv.messages, turn, limit=None)
            labels = rules_labels(point)
            found.append(labels)
            lines.append(labelled_line(self.job, conv, turn, point, labels, self._prov, None))
        self.output.finish(conv.index, lines, [], _counts(found))

    async def run(self) -> LabelSummary:
        """Label the whole input (or until ``stop``); returns the summary."""
        try:
            if self.job.engine == "rules":
                await self._run_rules()
            else:
                await self._run_llm()
        finally:
            self.summary.finished = time.monotonic()
            self.summary.done += self.output.flush()
            self.summary.totals = Counter(self.output.totals)
            self.summary.rejected = Counter(self.output.rejected)
            self.output.close()
        if self.fatal is not None:
            raise self.fatal
        return self.summary

    def _items(self) -> Iterator[Conversation | BadInput]:
        try:
            fmt = cast(Format, self.job.fmt)  # checked in LabelJob
            yield from read_conversations(self.job.input, column=self.job.column, fmt=fmt)
        except OSError as exc:
            raise InputError(f"{self.job.input}: cannot read: {exc.strerror or exc}") from None

    async def _run_rules(self) -> None:
        for n, item in enumerate(self._items()):
            if n % 256 == 0:
                await asyncio.sleep(0)  # let a signal handler run
                if self.stop_event.is_set():
                    break
            if self.output.is_done(item.index):
                continue
            if isinstance(item, BadInput):
                self._bad(item)
            else:
                self._rules(item)
            self._flush()

    async def _run_llm(self) -> None:
        job = self.job
        tasks: set[asyncio.Task[None]] = set()
        async with open_engine(job.config) as (engine, limit):
            self._prov["model"] = engine.model
            gate = engine.gate if engine.gate is not None else Gate(lambda: limit)
            # The engine's dialect: string bounds for llama.cpp, none for vLLM's xgrammar.
            fmt = response_format(bounded=engine.schema_dialect == "bounded")
            try:
                for item in self._items():
                    if self.stop_event.is_set() or self.fatal is not None:
                        break
                    if self.output.is_done(item.index):
                        continue
                    if isinstance(item, BadInput):
                        self._bad(item)
                        self._flush()
                        continue
                    await gate.acquire()
                    task = asyncio.create_task(self._llm_one(engine, fmt, item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _: gate.release())
                    self._flush()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _llm_one(self, engine: Engine, fmt: dict[str, Any], conv: Conversation) -> None:
        turns = decision_turns(conv.messages, self.job.all_turns)
        if not turns:
            reject = _reject(conv, "no_decision_point", "no user turn follows an assistant turn")
            self.output.finish(conv.index, [], [reject])
            return
        lines: list[bytes] = []
        rejects: list[dict[str, Any]] = []
        found: list[Labels] = []
        counts: Counter[str] = Counter()
        try:
            for turn in turns:
                point = point_at(conv.messages, turn)
                answers: list[Labels] = []
                failures: list[tuple[str, str]] = []
                for s in range(self.job.samples):
                    result = await self._ask(engine, fmt, point, conv.index, s, counts)
                    if isinstance(result, Labels):
                        answers.append(result)
                    else:
                        failures.append(result)
                if not answers:
                    reason, detail = failures[0]
                    rejects.append(_reject(conv, reason, detail, turn))
                    continue
                confidence = agreement(answers[0], answers[1]) if len(answers) > 1 else None
                if self.job.samples > 1 and len(answers) < 2:
                    confidence = 0.0  # one sample failed: nothing to agree with
                found.append(answers[0])
                lines.append(
                    labelled_line(self.job, conv, turn, point, answers[0], self._prov, confidence)
                )
        except EngineError as exc:
            if self.fatal is None:
                self.fatal = exc
            return  # not finished: the next run does this conversation again
        counts.update(_counts(found))
        self.output.finish(conv.index, lines, rejects, counts)
        self._flush()

    async def _ask(
        self,
        engine: Engine,
        fmt: dict[str, Any],
        point: Point,
        index: int,
        sample: int,
        counts: Counter[str],
    ) -> Labels | tuple[str, str]:
        """One request: the labels, or ``(reason, detail)`` why this answer is unusable."""
        sampling = self.job.config.sampling.body(index * self.job.samples + sample)
        base = self.job.config.sampling.seed or 0
        sampling["seed"] = base + index * self.job.samples + sample  # distinct, reproducible
        sampling["max_tokens"] = min(sampling["max_tokens"], ANSWER_MAX_TOKENS)
        completion = await engine.chat(
            prompt_messages(point), response_format=fmt, sampling=sampling
        )
        counts["requests"] += 1
        counts["prompt_tokens"] += completion.prompt_tokens
        counts["completion_tokens"] += completion.completion_tokens
        if completion.finish_reason == "length":
            return "truncated", f"the answer hit max_tokens ({sampling['max_tokens']})"
        try:
            return parse_answer(point, completion.content)
        except AnswerError as exc:
            return exc.reason, str(exc)
