"""The LLM judge: a structured rubric, asked twice with the two responses swapped.

For one conversation (a ``Record`` on its way to the store, or a hand-labelled one in
``dreamgen judge-eval``) the judge sees the exchange up to the decision turn, the two
responses as A and B, and the labelled cue and distractor quotes, and answers ONE fixed
JSON schema (``JudgeAnswer``; one schema per run, so servers compile its grammar once):

(a) which response follows the user's direction: asked twice, A/B order randomised by
    record id and then swapped; two different picks of *content* is a position-bias
    failure; (b) per cue quote: does it carry direction, and which cue kind is it (asked,
    not shown: agreement with the label is measured); (c) per distractor quote: is it the
    assistant's own idea; (d) coherence 1–5; (e) difficulty 1–5; and which responses name
    a factual error or risk in the user's request (checked only where ``stakes != none``).

``Judge.judge(record)`` returns a ``Verdict``: the scores for ``Record.quality`` and, in
``filter`` mode, the first failed check as a named rejection (``Reason``). The pipeline
runs it between the synchronous stages (see ``stages.JUDGE_BEFORE``), inside the same
bounded in-flight window as generation. On or off, which engine, calibration:
``dreamgen.judge_setup``; measuring it: ``dreamgen.judge_eval``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamgen.config import JudgeConfig
from dreamgen.engines.base import Completion, Engine, EngineError
from dreamgen.errors import first_error
from dreamgen.labelled import Labelled
from dreamgen.record import Quality, Record
from dreamgen.taxonomy import DESCRIPTIONS, DIFFICULTY, CueKind

SCHEMA_NAME = "judge"
MAX_SPANS = 3  # quotes judged per kind: a record has at most 3 of each


class Reason(StrEnum):
    """Why the judge stage rejects a record (each a failed rubric check, or no verdict)."""

    judge_error = "judge_error"  # the judge engine gave no answer
    judge_invalid = "judge_invalid"  # the answer is not JSON of the judge schema
    judge_position_bias = "judge_position_bias"  # the two A/B orders picked different replies
    judge_prefers_reflex = "judge_prefers_reflex"  # both orders picked the reflex
    judge_cue_direction = "judge_cue_direction"  # a cue quote carries no direction
    judge_cue_kind = "judge_cue_kind"  # cue kinds disagree with the labels
    judge_distractor = "judge_distractor"  # a distractor is not the assistant's own idea
    judge_incoherent = "judge_incoherent"  # coherence below the threshold
    judge_difficulty = "judge_difficulty"  # judged difficulty far from the labelled one
    judge_stakes_unnamed = "judge_stakes_unnamed"  # stakes != none, listening names no problem


# ---- the model-facing schema ---------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class CueVerdict(_Model):
    """The judge on one cue quote."""

    direction: bool
    kind: CueKind


class DistractorVerdict(_Model):
    """The judge on one distractor quote."""

    own_idea: bool


class JudgeAnswer(_Model):
    """What the judge writes, under guided decoding (the one judge schema)."""

    follows: Literal["A", "B"]
    cues: Annotated[list[CueVerdict], Field(max_length=MAX_SPANS)]
    distractors: Annotated[list[DistractorVerdict], Field(max_length=MAX_SPANS)]
    coherence: Annotated[int, Field(ge=1, le=5)]
    difficulty: Annotated[int, Field(ge=1, le=5)]
    names_problem: Literal["A", "B", "both", "neither"]


RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": JudgeAnswer.model_json_schema()},
}


# ---- what is judged --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One conversation to judge, from a Record or a labelled line: the judge sees this."""

    key: str  # picks the first A/B order (stable across runs and resumes)
    messages: Sequence[tuple[str, str]]  # (role, content) up to the decision turn
    cues: Sequence[tuple[str, str]]  # (quote, labelled kind)
    distractors: Sequence[tuple[str, str]]
    listening: str
    reflex: str
    difficulty: int | None = None
    stakes: str = "none"

    @property
    def listening_first(self) -> bool:
        """Whether the first ask shows the listening response as A (the second swaps)."""
        return hashlib.sha256(self.key.encode()).digest()[0] & 1 == 1


def case_from_record(record: Record) -> Case:
    """A record as the judge sees it.

    Distractors quoted from the contrast response are left out: quoting the reflex would
    tell the judge which of A and B it is.
    """
    return Case(
        key=record.id,
        messages=[(m.role, m.content) for m in record.messages],
        cues=[(s.text, s.kind) for s in record.cues],
        distractors=[
            (s.text, s.kind) for s in record.distractors if not record.is_response(s.message)
        ],
        listening=record.target.content,
        reflex=record.contrast.content,
        difficulty=record.difficulty,
        stakes=str(record.axes.stakes),
    )


def case_from_labelled(item: Labelled, index: int) -> Case | None:
    """A labelled conversation as a case; None without both listening and reflex."""
    if item.listening is None or item.reflex is None:
        return None
    return Case(
        key=item.id or f"line-{index}",
        messages=[(m.role, m.content) for m in item.messages],
        cues=[(s.text, str(s.kind)) for s in item.cues],
        distractors=[(s.text, str(s.kind)) for s in item.distractors],
        listening=item.listening,
        reflex=item.reflex,
        difficulty=item.difficulty,
    )


# ---- the prompt --------------------------------------------------------------------------

SYSTEM = (
    "You judge training data for an assistant that must follow the user's direction "
    "instead of its own ideas. Read carefully and answer with the JSON object only."
)


def _quote(text: str) -> str:
    return orjson.dumps(text).decode()


def judge_messages(case: Case, listening_as_a: bool) -> list[dict[str, str]]:
    """The chat messages of one ask; ``listening_as_a`` puts the listening reply first."""
    a, b = (case.listening, case.reflex) if listening_as_a else (case.reflex, case.listening)
    turns = "\n".join(
        f"[{i + 1}] {role}: {content}" for i, (role, content) in enumerate(case.messages)
    )
    cues = "\n".join(f"C{i + 1}: {_quote(t)}" for i, (t, _) in enumerate(case.cues[:MAX_SPANS]))
    dis = "\n".join(
        f"D{i + 1}: {_quote(t)}" for i, (t, _) in enumerate(case.distractors[:MAX_SPANS])
    )
    kinds = "\n".join(f"- {k.value}: {DESCRIPTIONS[k.value]}" for k in CueKind)
    levels = "\n".join(f"{d} = {text}" for d, text in DIFFICULTY.items())
    n_cues = min(len(case.cues), MAX_SPANS)
    n_dis = min(len(case.distractors), MAX_SPANS)
    user = (
        "The conversation, which stops at the user's last turn:\n"
        f"{turns}\n\n"
        "Two candidate assistant replies to the last turn:\n"
        f"Response A:\n{a}\n\n"
        f"Response B:\n{b}\n\n"
        "Quotes from user turns said to carry the user's direction (cues):\n"
        f"{cues or '(none)'}\n\n"
        "Quotes from assistant turns said to be the assistant's own competing idea "
        f"(distractors):\n{dis or '(none)'}\n\n"
        f"Cue kinds:\n{kinds}\n\n"
        f"Difficulty levels:\n{levels}\n\n"
        "Answer with:\n"
        '- follows: "A" or "B", the reply that does what the user directed;\n'
        f"- cues: {n_cues} entries, one per cue quote in order: direction (does it "
        "tell the assistant what the user wants?) and kind (one of the cue kinds);\n"
        f"- distractors: {n_dis} entries, one per distractor quote in order: "
        "own_idea (is it the assistant's own idea, not something the user asked for?);\n"
        "- coherence: 1 to 5, how coherent and natural the conversation is;\n"
        "- difficulty: 1 to 5, by the levels above;\n"
        '- names_problem: "A", "B", "both" or "neither": which replies point out a factual '
        "error or a real risk in what the user asked."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ---- reading the answers ----------------------------------------------------------------


class InvalidAnswer(ValueError):
    """A judge answer that is not JSON of the judge schema (one line); ``completion``: the
    answer it came in, when there was one (its tokens still count)."""

    completion: Completion | None = None


def parse_answer(content: str) -> JudgeAnswer:
    """The judge's raw answer as a ``JudgeAnswer``, or ``InvalidAnswer``."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise InvalidAnswer(f"not JSON: {exc}") from None
    try:
        return JudgeAnswer.model_validate(data)
    except ValidationError as exc:
        raise InvalidAnswer(first_error(exc)) from None


@dataclass(frozen=True, slots=True)
class Reading:
    """One answer mapped back from letters to roles; a missing span verdict fails."""

    picked_listening: bool
    cue_direction: tuple[bool, ...]
    cue_kinds: tuple[str | None, ...]
    distractor_own: tuple[bool, ...]
    coherence: int
    difficulty: int
    listening_names_problem: bool

    @classmethod
    def of(cls, answer: JudgeAnswer, case: Case, listening_as_a: bool) -> Reading:
        letter = "A" if listening_as_a else "B"
        n_cues, n_dis = min(len(case.cues), MAX_SPANS), min(len(case.distractors), MAX_SPANS)
        cues = answer.cues[:n_cues]
        dis = answer.distractors[:n_dis]
        pad = n_cues - len(cues)
        return cls(
            picked_listening=answer.follows == letter,
            cue_direction=tuple(c.direction for c in cues) + (False,) * pad,
            cue_kinds=tuple(str(c.kind) for c in cues) + (None,) * pad,
            distractor_own=tuple(d.own_idea for d in dis) + (False,) * (n_dis - len(dis)),
            coherence=answer.coherence,
            difficulty=answer.difficulty,
            listening_names_problem=answer.names_problem in (letter, "both"),
        )


def _share(hits: int, n: int) -> float:
    return hits / n if n else 1.0


@dataclass(frozen=True, slots=True)
class Assessment:
    """Both asks of one case: the first with ``case.listening_first``'s order, then swapped."""

    case: Case
    readings: tuple[Reading, Reading]

    @property
    def agree(self) -> bool:
        """Both orders picked the same response (no position bias on this case)."""
        return self.readings[0].picked_listening == self.readings[1].picked_listening

    @property
    def pairwise(self) -> float:
        """Share of the two asks that picked the listening response: 0, 0.5 or 1."""
        return sum(r.picked_listening for r in self.readings) / 2

    @property
    def cue_direction(self) -> float:
        """Share of cue quotes that both asks say carry direction."""
        a, b = (r.cue_direction for r in self.readings)
        return _share(sum(x and y for x, y in zip(a, b, strict=True)), len(a))

    def kind_hits(self) -> list[tuple[str, bool]]:
        """(labelled kind, judge agreed) for every cue quote in every ask."""
        labels = [kind for _, kind in self.case.cues[:MAX_SPANS]]
        return [
            (k, got == k) for r in self.readings for k, got in zip(labels, r.cue_kinds, strict=True)
        ]

    @property
    def kind_agreement(self) -> float:
        """Share of (cue quote, ask) where the judge's kind is the labelled one."""
        hits = self.kind_hits()
        return _share(sum(ok for _, ok in hits), len(hits))

    @property
    def distractor_own(self) -> float:
        """Share of distractor quotes that both asks say are the assistant's own idea."""
        a, b = (r.distractor_own for r in self.readings)
        return _share(sum(x and y for x, y in zip(a, b, strict=True)), len(a))

    @property
    def coherence(self) -> float:
        return sum(r.coherence for r in self.readings) / 2

    @property
    def difficulty(self) -> float:
        return sum(r.difficulty for r in self.readings) / 2

    @property
    def problem_named(self) -> bool:
        """Both asks say the listening response names a problem in the user's request."""
        return all(r.listening_names_problem for r in self.readings)

    def failures(self, t: JudgeConfig) -> list[Reason]:
        """Every rubric check this case fails under the thresholds ``t``, in rubric order."""
        out: list[Reason] = []
        if not self.agree:
            if t.require_agreement:
                out.append(Reason.judge_position_bias)
        elif self.pairwise == 0:
            out.append(Reason.judge_prefers_reflex)
        if self.cue_direction < t.min_cue_direction:
            out.append(Reason.judge_cue_direction)
        if self.kind_agreement < t.min_kind_agreement:
            out.append(Reason.judge_cue_kind)
        if self.distractor_own < t.min_distractor_own:
            out.append(Reason.judge_distractor)
        if self.coherence < t.min_coherence:
            out.append(Reason.judge_incoherent)
        gap = abs(self.difficulty - self.case.difficulty) if self.case.difficulty else 0.0
        if gap > t.max_difficulty_gap:
            out.append(Reason.judge_difficulty)
        if self.case.stakes != "none" and t.require_problem_named and not self.problem_named:
            out.append(Reason.judge_stakes_unnamed)
        return out

    def quality(self, base: Quality, model: str, failed: Sequence[Reason]) -> Quality:
        """``base`` with the judge's scores filled in."""
        return base.model_copy(
            update={
                "judged": True,
                "judge_model": model,
                "judge_pairwise": self.pairwise,
                "judge_agree": self.agree,
                "judge_cue_direction": round(self.cue_direction, 4),
                "judge_kind_agreement": round(self.kind_agreement, 4),
                "judge_distractor_own": round(self.distractor_own, 4),
                "judge_coherence": self.coherence,
                "judge_difficulty": self.difficulty,
                "judge_problem_named": self.problem_named,
                "judge_failed": ",".join(failed),
            }
        )


# ---- asking ------------------------------------------------------------------------------


class Judge:
    """Asks ``engine`` the rubric; ``gate``: the judge's own window (its own server only).

    ``usage`` collects every judge completion so the caller counts judge tokens apart.
    """

    def __init__(self, engine: Engine, settings: JudgeConfig, *, own_window: bool) -> None:
        self.engine = engine
        self.settings = settings
        # On the generator's engine the judge runs inside the caller's slot; on its own
        # server it also takes a slot of that server's window (it may be the slower one).
        self.gate = engine.gate if own_window else None

    @property
    def model(self) -> str:
        return self.engine.model

    @property
    def filtering(self) -> bool:
        return self.settings.mode == "filter"

    async def ask(self, case: Case, listening_as_a: bool) -> tuple[Completion, Reading]:
        """One ask; raises EngineError (no answer) or InvalidAnswer."""
        sampling = {
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }
        messages = judge_messages(case, listening_as_a)
        if self.gate is not None:
            await self.gate.acquire()
        try:
            completion = await self.engine.chat(
                messages, response_format=RESPONSE_FORMAT, sampling=sampling
            )
        finally:
            if self.gate is not None:
                self.gate.release()
        try:
            if completion.finish_reason == "length":
                raise InvalidAnswer(f"cut off at max_tokens ({self.settings.max_tokens})")
            return completion, Reading.of(parse_answer(completion.content), case, listening_as_a)
        except InvalidAnswer as exc:
            exc.completion = completion
            raise

    async def assess(self, case: Case) -> tuple[list[Completion], Assessment]:
        """Both asks, concurrently (order, then swapped); raises like ``ask``.

        The completions come back even when an ask fails (``AssessFailed``), so every
        judge token is counted.
        """
        first = case.listening_first
        results = await asyncio.gather(
            self.ask(case, first), self.ask(case, not first), return_exceptions=True
        )
        done = [r for r in results if not isinstance(r, BaseException)]
        completions = [c for c, _ in done]
        completions += [
            r.completion for r in results if isinstance(r, InvalidAnswer) and r.completion
        ]
        for r in results:
            if isinstance(r, asyncio.CancelledError):
                raise r
            if isinstance(r, (EngineError, InvalidAnswer)):
                raise AssessFailed(r, completions)
            if isinstance(r, BaseException):
                raise r
        return completions, Assessment(case, (done[0][1], done[1][1]))

    async def judge(self, record: Record) -> Verdict:
        """The verdict on one record: its scores, and the rejection (filter mode)."""
        try:
            completions, assessment = await self.assess(case_from_record(record))
        except AssessFailed as exc:
            cause = exc.cause
            reason = Reason.judge_error if isinstance(cause, EngineError) else Reason.judge_invalid
            return Verdict(reason, str(cause), None, exc.completions, cause)
        failed = assessment.failures(self.settings)
        quality = assessment.quality(record.quality, self.model, failed)
        if failed and self.filtering:
            return Verdict(failed[0], ", ".join(failed), quality, completions)
        return Verdict(None, "", quality, completions)


class AssessFailed(Exception):
    """An ask failed (``cause``: EngineError or InvalidAnswer); ``completions`` that came back."""

    def __init__(self, cause: Exception, completions: list[Completion]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.completions = completions


@dataclass(slots=True)
class Verdict:
    """The judge on one record: ``reason`` None keeps it (with ``quality``)."""

    reason: Reason | None
    message: str
    quality: Quality | None
    completions: list[Completion]
    error: Exception | None = None  # the engine error or invalid answer behind judge_error/_invalid
