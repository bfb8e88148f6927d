"""``dreamgen judge-eval``: the judge measured on labelled conversations with known answers.

Each conversation with both a listening and a reflex response is judged as a build judges
a record (``dreamgen.judge``, both A/B orders). Reported, with counts and a 95% CI
(a bootstrap over conversations, seeded: the two asks of one conversation are not
independent):

- pairwise accuracy: share of asks that pick the listening response;
- position bias: share of conversations whose two asks picked different responses;
- span-kind agreement: share of (cue, ask) where the judge's kind is the gold one, also
  per gold cue kind.

An ask with no valid answer counts as a miss (and is counted). ``--save`` writes the
``Calibration`` a build's ``judge.calibration`` reads; a judge below ``judge.floor`` is
refused for filtering there.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from dreamgen.config import Config
from dreamgen.engines.base import EngineError
from dreamgen.judge import AssessFailed, Assessment, Case, Judge, case_from_labelled
from dreamgen.judge_setup import Calibration, judge_model_name, open_judge
from dreamgen.labelled import read_labelled

BOOTSTRAP = 2000


@dataclass(slots=True)
class Tally:
    """Per conversation: asks picking listening, asks, kind hits per gold kind."""

    picks: int = 0
    asks: int = 0
    disagree: bool = False
    kinds: list[tuple[str, bool]] = field(default_factory=list)


@dataclass(slots=True)
class EvalResult:
    """What one judge-eval measured."""

    model: str
    dataset: Path
    tallies: list[Tally]
    skipped: int  # lines without both listening and reflex
    invalid: int  # asks whose answer was not valid judge JSON
    errors: int  # asks the engine did not answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def n(self) -> int:
        return len(self.tallies)

    @property
    def pairwise_accuracy(self) -> float:
        return _ratio([(t.picks, t.asks) for t in self.tallies])

    @property
    def position_bias(self) -> float:
        return _ratio([(int(t.disagree), 1) for t in self.tallies])

    @property
    def kind_agreement(self) -> float:
        return _ratio([(sum(ok for _, ok in t.kinds), len(t.kinds)) for t in self.tallies])

    def per_kind(self) -> dict[str, tuple[int, int]]:
        """Gold cue kind → (agreeing asks, asks)."""
        hits: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for t in self.tallies:
            for kind, ok in t.kinds:
                total[kind] += 1
                hits[kind] += ok
        return {k: (hits[k], total[k]) for k in sorted(total)}


def _ratio(parts: Sequence[tuple[int, int]]) -> float:
    den = sum(d for _, d in parts)
    return sum(n for n, _ in parts) / den if den else 0.0


def bootstrap_ci(parts: Sequence[tuple[int, int]], seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of a ratio of sums, resampling conversations (``BOOTSTRAP`` times)."""
    if not parts:
        return (0.0, 0.0)
    rng = random.Random(seed)
    stats = sorted(_ratio(rng.choices(parts, k=len(parts))) for _ in range(BOOTSTRAP))
    return (stats[int(0.025 * BOOTSTRAP)], stats[int(0.975 * BOOTSTRAP) - 1])


def _tally(a: Assessment) -> Tally:
    return Tally(
        picks=sum(r.picked_listening for r in a.readings),
        asks=2,
        disagree=not a.agree,
        kinds=a.kind_hits(),
    )


async def evaluate(
    judge: Judge, cases: Sequence[Case], *, concurrency: int = 4
) -> tuple[list[Tally], int, int, int, int]:
    """Judge every case, ``concurrency`` at a time; (tallies, invalid, errors, tokens in/out).

    A case whose asks fail still counts: its picks as misses, its cues as disagreements.
    """
    window = asyncio.Semaphore(concurrency)
    counts = Counter[str]()

    async def one(case: Case) -> Tally:
        async with window:
            try:
                completions, assessment = await judge.assess(case)
            except AssessFailed as failed:
                completions = failed.completions
                counts["errors" if isinstance(failed.cause, EngineError) else "invalid"] += 1
                kinds = [(kind, False) for _, kind in case.cues[:3] for _ in range(2)]
                # The ask that answered is not used: both asks or neither (their pairing).
                tally = Tally(picks=0, asks=2, disagree=False, kinds=kinds)
            else:
                tally = _tally(assessment)
            counts["prompt"] += sum(c.prompt_tokens for c in completions)
            counts["completion"] += sum(c.completion_tokens for c in completions)
            return tally

    tallies = await asyncio.gather(*(one(c) for c in cases))
    return (
        list(tallies),
        counts["invalid"],
        counts["errors"],
        counts["prompt"],
        counts["completion"],
    )


def load_cases(path: Path, limit: int | None = None) -> tuple[list[Case], int]:
    """The judgeable cases of a labelled file, and how many lines were skipped."""
    cases: list[Case] = []
    skipped = 0
    for i, item in enumerate(read_labelled(path)):
        case = case_from_labelled(item, i)
        if case is None:
            skipped += 1
        else:
            cases.append(case)
        if limit is not None and len(cases) >= limit:
            break
    return cases, skipped


async def run_eval(
    path: Path, config: Config, *, concurrency: int = 4, limit: int | None = None
) -> EvalResult:
    """Open the configured judge engine and evaluate it on ``path``."""
    cases, skipped = load_cases(path, limit)
    t0 = time.monotonic()
    async with open_judge(config, None) as judge:
        assert judge is not None  # open_judge without a generator always opens one
        tallies, invalid, errors, p_tok, c_tok = await evaluate(
            judge, cases, concurrency=concurrency
        )
    return EvalResult(
        model=judge_model_name(config),
        dataset=path,
        tallies=tallies,
        skipped=skipped,
        invalid=invalid,
        errors=errors,
        prompt_tokens=p_tok,
        completion_tokens=c_tok,
        elapsed_s=time.monotonic() - t0,
    )


def report(result: EvalResult, floor: float) -> list[str]:
    """The printed report; the last line is ``pairwise_accuracy=… position_bias=… …``."""
    t = result.tallies

    def row(label: str, parts: list[tuple[int, int]]) -> str:
        hits, n = sum(h for h, _ in parts), sum(d for _, d in parts)
        if not n:
            return f"{label}: nothing to measure"
        lo, hi = bootstrap_ci(parts)
        return f"{label}: {hits / n:.3f}  95% CI [{lo:.3f}, {hi:.3f}]  ({hits}/{n})"

    lines = [
        f"judge {result.model} on {result.dataset}: {result.n} conversations "
        f"({result.skipped} skipped: no listening/reflex), {2 * result.n} asks, "
        f"{result.invalid} with an invalid answer, {result.errors} with no answer",
        row("pairwise accuracy (asks picking listening)", [(x.picks, x.asks) for x in t]),
        row("position bias (conversations, orders disagree)", [(int(x.disagree), 1) for x in t]),
        row(
            "span-kind agreement (cue x ask)",
            [(sum(ok for _, ok in x.kinds), len(x.kinds)) for x in t],
        ),
    ]
    for kind, (hits, n) in result.per_kind().items():
        lines.append(f"  {kind:<22} {hits / n:.3f}  ({hits}/{n})")
    lines.append(
        f"judge tokens: {result.prompt_tokens} prompt, {result.completion_tokens} completion, "
        f"{result.elapsed_s:.1f}s"
    )
    if result.pairwise_accuracy < floor:
        lines.append(
            f"refused for filtering: pairwise accuracy {result.pairwise_accuracy:.3f} is below "
            f'judge.floor {floor:g} (judge.mode = "score" may still score)'
        )
    else:
        lines.append(f"may filter: pairwise accuracy is at or above judge.floor {floor:g}")
    lines.append(
        f"pairwise_accuracy={result.pairwise_accuracy:.3f} "
        f"position_bias={result.position_bias:.3f} "
        f"kind_agreement={result.kind_agreement:.3f} n={result.n}"
    )
    return lines


def calibration(result: EvalResult, floor: float) -> Calibration:
    """The calibration record of ``result`` (what ``--save`` writes)."""
    picks = [(x.picks, x.asks) for x in result.tallies]
    return Calibration(
        model=result.model,
        dataset=str(result.dataset),
        dataset_sha256=hashlib.sha256(Path(result.dataset).read_bytes()).hexdigest(),
        n=result.n,
        pairwise_accuracy=round(result.pairwise_accuracy, 4),
        pairwise_ci=bootstrap_ci(picks),
        position_bias=round(result.position_bias, 4),
        kind_agreement=round(result.kind_agreement, 4),
        floor=floor,
        created_at=round(time.time(), 3),
    )


def save_calibration(result: EvalResult, floor: float, path: Path) -> Path:
    """Write the calibration file for ``judge.calibration``."""
    data = calibration(result, floor).model_dump(mode="json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    return path


def judge_eval(
    path: Path,
    config: Config,
    *,
    concurrency: int = 4,
    limit: int | None = None,
    save: Path | None = None,
    emit: Callable[[str], object] = print,
) -> EvalResult:
    """Run, print the report through ``emit``, optionally save the calibration."""
    result = asyncio.run(run_eval(path, config, concurrency=concurrency, limit=limit))
    lines = report(result, config.judge.floor)
    if save is not None:
        save_calibration(result, config.judge.floor, save)
        lines.insert(-1, f"calibration written to {save}")
    for line in lines:
        emit(line)
    return result
