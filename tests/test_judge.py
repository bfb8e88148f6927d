"""The LLM judge stage and `dreamgen judge-eval`.

Against the simulated vLLM server (its judge answers are heuristics computed from the
judge prompt, ``tests/fake_vllm.judge_answer``): builds with ``--judge`` (SIGKILLed and
resumed), a position-biased judge, non-JSON answers, an unreachable judge server,
calibration and the floor. On the real SmolLM2 (``test_smollm2_*``): the schema, the swap,
thresholds, counting and resume, with the model's own answers.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from cli import dreamgen, one_error_line
from fake_vllm import SimProcess

from bench.soak import build_cmd
from dreamgen.audit import audit
from dreamgen.config import Config, ConfigError, JudgeConfig
from dreamgen.engines import EMBEDDED_MODEL
from dreamgen.judge import (
    Assessment,
    Case,
    Reading,
    Reason,
    case_from_labelled,
    judge_messages,
    parse_answer,
)
from dreamgen.judge_setup import open_judge, resolve
from dreamgen.labelled import read_labelled
from dreamgen.pipeline import Run
from dreamgen.reader import read

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "tests" / "data" / "dev.jsonl"
# Everything but the pairwise check relaxed: the fake's kind guesses and difficulty are
# crude, and a build must be able to reach its target.
LAX = {"floor": 0.0, "min_kind_agreement": 0.0, "max_difficulty_gap": 4.0}


def toml(path: Path, judge: dict[str, object], extra: str = "") -> Path:
    body = "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in judge.items())
    path.write_text(f"{extra}\n[judge]\n{body}\n")
    return path


@pytest.fixture
def sim() -> Iterator[SimProcess]:
    with SimProcess("--profile", "stress") as s:
        yield s


def dev_cases() -> list[Case]:
    cases = [case_from_labelled(item, i) for i, item in enumerate(read_labelled(DEV))]
    return [c for c in cases if c is not None]


# ---- the rubric's rules, on hand-made readings -------------------------------------------


def reading(picked: bool, *, kind: str = "constraint", coherence: int = 4) -> Reading:
    return Reading(
        picked_listening=picked,
        cue_direction=(True,),
        cue_kinds=(kind,),
        distractor_own=(True,),
        coherence=coherence,
        difficulty=2,
        listening_names_problem=False,
    )


CASE = Case("k", [("user", "do it in C")], [("in C", "constraint")], [], "ok in C", "use Rust")


def test_each_failed_check_is_a_named_reason_in_rubric_order() -> None:
    t = JudgeConfig()
    assert Assessment(CASE, (reading(True), reading(True))).failures(t) == []
    biased = Assessment(CASE, (reading(True), reading(False)))
    assert biased.failures(t) == [Reason.judge_position_bias]
    assert biased.failures(t.model_copy(update={"require_agreement": False})) == []
    reflex = Assessment(CASE, (reading(False, kind="preference"), reading(False, coherence=1)))
    # Kinds: 1 of 2 asks agree, 0.5 passes the default; coherence: the mean 2.5 < 3.
    assert reflex.failures(t) == [Reason.judge_prefers_reflex, Reason.judge_incoherent]
    stricter = t.model_copy(update={"min_kind_agreement": 0.6})
    assert Reason.judge_cue_kind in reflex.failures(stricter)
    stakes = Case("k", CASE.messages, CASE.cues, [], "ok", "no", difficulty=2, stakes="risky")
    assert Assessment(stakes, (reading(True), reading(True))).failures(t) == [
        Reason.judge_stakes_unnamed
    ]


# ---- against the simulated vLLM server --------------------------------------------------


def test_judged_build_survives_sigkill_with_judge_state_intact(tmp_path: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "reported.txt"
    config = toml(tmp_path / "c.toml", LAX, "concurrency = 16\n[store]\nflush_records = 2")
    target, kills = 60, 0
    with SimProcess("--profile", "8b", "--speedup", "20") as sim:
        cmd = [*build_cmd(report, out, config, sim.base_url, sim.model, target, 0), "--judge"]
        for _ in range(3):
            before = report.stat().st_size if report.exists() else 0
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if report.exists() and report.stat().st_size >= before + 5 * 33:
                    break  # a few records reported in this cycle: kill mid-flow
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert kills == 3
    records = list(read(out))
    assert len(records) == target
    ids = [r.id for r in records]
    assert len(set(ids)) == target  # none written twice
    assert all(r.quality.judged and r.quality.judge_model == sim.model for r in records)
    # Filter mode: a kept record passed, in both A/B orders.
    assert all(r.quality.judge_agree and r.quality.judge_pairwise == 1.0 for r in records)
    reported = report.read_text().split()
    assert set(reported) <= set(ids)  # every record reported accepted is still there
    assert audit(out) == (target, [])
    totals = orjson.loads((out / "manifest.json").read_bytes())["totals"]
    assert totals["judge_requests"] >= 2 * target and totals["judge_completion_tokens"] > 0
    assert totals["rejected"].get("judge_prefers_reflex", 0) > 0  # the heuristic judge bites


def _run_until(cfg: Config, requests: int) -> Run:
    run = Run(cfg)

    def stop_after(summary: object) -> None:
        if run.summary.requests >= requests:
            run.stop("test")

    run.on_progress = stop_after
    asyncio.run(run.run(grace_s=10))
    return run


def test_a_judge_that_always_answers_a_is_counted_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with SimProcess("--profile", "stress") as good:
        cfg = Config(
            engine="openai",
            servers=[good.url],
            model=good.model,
            out=out,
            count=5,
            judge={**LAX, "enabled": True},
        )
        asyncio.run(Run(cfg).run())
    kept = {r.id for r in read(out)}
    assert len(kept) == 5
    with SimProcess("--profile", "stress", "--judge", "always_a") as biased:
        cfg = cfg.model_copy(update={"servers": [biased.url], "count": 50})
        run = _run_until(cfg, 40)
    rejected = run.summary.rejected
    assert run.summary.accepted == 0 and rejected["judge_position_bias"] > 0
    assert {r.id for r in read(out)} == kept  # what was accepted before is all still there
    assert run.summary.judge_completion_tokens > 0


def test_non_json_judge_answers_from_its_own_server_are_counted(tmp_path: Path) -> None:
    with (
        SimProcess("--profile", "stress") as gen,
        SimProcess("--profile", "stress", "--judge", "malformed", "--model", "judge-m") as jdg,
    ):
        cfg = Config(
            engine="openai",
            servers=[gen.url],
            model=gen.model,
            out=tmp_path / "out",
            count=50,
            judge={**LAX, "enabled": True, "server": jdg.url, "model": "judge-m"},
        )
        run = _run_until(cfg, 30)
        judge_seen = jdg.stats()["requests_received"]
    assert run.summary.accepted == 0 and run.summary.rejected["judge_invalid"] > 0
    assert judge_seen == run.summary.judge_requests > 0  # the judge's own server was asked


def test_unreachable_judge_server_is_one_error_line(tmp_path: Path, sim: SimProcess) -> None:
    config = toml(tmp_path / "c.toml", {**LAX, "server": "http://127.0.0.1:9", "model": "j"})
    proc = dreamgen(
        "build", "--server", sim.url, "--model", sim.model, "--judge",
        "--config", str(config), "--out", str(tmp_path / "o"), "--count", "3", "--quiet",
    )  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith("error: judge:") and "cannot reach http://127.0.0.1:9" in line


def test_judge_eval_calibrates_and_a_judge_below_the_floor_is_refused(tmp_path: Path) -> None:
    cal = tmp_path / "cal.json"
    with SimProcess("--profile", "stress", "--judge", "always_a") as biased:
        proc = dreamgen(
            "judge-eval", str(DEV), "--server", biased.url, "--model", biased.model,
            "--save", str(cal),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        last = proc.stdout.strip().splitlines()[-1]
        m = re.fullmatch(
            r"pairwise_accuracy=(\S+) position_bias=(\S+) kind_agreement=(\S+) n=(\d+)", last
        )
        assert m is not None, last
        # Always "A": right in exactly one of the two orders, and never consistent.
        assert (float(m[1]), float(m[2]), int(m[4])) == (0.5, 1.0, 41)
        assert "refused for filtering" in proc.stdout and "95% CI" in proc.stdout
        config = toml(tmp_path / "c.toml", {"calibration": str(cal), "floor": 0.7})
        args = ["--server", biased.url, "--model", biased.model, "--config", str(config)]
        out = tmp_path / "o"
        proc = dreamgen("build", *args, "--judge", "--out", str(out), "--count", "2", "--quiet")
        line = one_error_line(proc)
        assert "refused for filtering" in line and "0.500" in line
        assert not out.exists()  # refused before the output folder was touched
        scored = toml(tmp_path / "s.toml", {**LAX, "calibration": str(cal), "mode": "score"})
        args[-1] = str(scored)
        proc = dreamgen("build", *args, "--judge", "--out", str(out), "--count", "2", "--quiet")
        assert proc.returncode == 0, proc.stderr
    assert all(
        r.quality.judged and "judge_position_bias" in r.quality.judge_failed for r in read(out)
    )


def test_the_judge_is_on_by_default_only_for_a_calibrated_server_judge(tmp_path: Path) -> None:
    cal = tmp_path / "cal.json"
    cal.write_bytes(
        orjson.dumps(
            {
                "model": "m", "dataset": "d", "dataset_sha256": "0", "n": 41,
                "pairwise_accuracy": 0.8, "pairwise_ci": [0.7, 0.9], "position_bias": 0.1,
                "kind_agreement": 0.5, "floor": 0.7, "created_at": 0.0,
            }
        )
    )  # fmt: skip
    server = {"engine": "openai", "servers": ["http://x"], "model": "m"}
    assert resolve(Config(**server, judge={"calibration": cal})).judge.enabled is True
    assert resolve(Config(**server)).judge.enabled is False  # not calibrated
    assert (
        resolve(Config(**server, judge={"calibration": cal, "floor": 0.9})).judge.enabled is False
    )
    assert resolve(Config(judge={"calibration": cal})).judge.enabled is False  # embedded
    with pytest.raises(ConfigError, match="for model 'm', not 'other'"):
        resolve(Config(**server, judge={"enabled": True, "calibration": cal, "model": "other"}))
    with pytest.raises(ConfigError, match="not calibrated"):
        resolve(Config(**server, judge={"enabled": True}))
    # The judge shapes the data: a judged build is another dataset than an unjudged one.
    judged = resolve(Config(**server, judge={"enabled": True, "floor": 0}))
    assert "judge" in judged.data_config() and "judge" not in Config(**server).data_config()


# ---- on the real SmolLM2 ----------------------------------------------------------------


def test_smollm2_answers_the_schema_in_both_orders_and_thresholds_apply(
    embedded_url: str,
) -> None:
    cfg = Config(engine="openai", servers=[embedded_url], model=EMBEDDED_MODEL)
    cfg = cfg.model_copy(update={"judge": JudgeConfig(enabled=True, floor=0)})
    case = next(c for c in dev_cases() if len(c.cues) == 2)

    async def go() -> tuple[list[str], Assessment]:
        async with open_judge(cfg, None) as judge:
            assert judge is not None
            completions, assessment = await judge.assess(case)
            return [c.content for c in completions], assessment

    contents, a = asyncio.run(go())
    answers = [parse_answer(c) for c in contents]  # the model's own JSON, in the schema
    orders = (case.listening_first, not case.listening_first)
    for answer, listening_as_a, r in zip(answers, orders, a.readings, strict=True):
        assert r.picked_listening == (answer.follows == ("A" if listening_as_a else "B"))
        assert len(r.cue_kinds) == 2
    # The swap really swaps what the model saw.
    first, second = (judge_messages(case, o)[1]["content"] for o in orders)
    assert first != second and case.listening in first and case.reflex in second
    a_first = first.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
    a_second = second.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
    assert {a_first, a_second} == {case.listening, case.reflex}
    # Thresholds, at the model's own scores.
    t = JudgeConfig(require_agreement=False, min_cue_direction=0, min_kind_agreement=0,
                    min_distractor_own=0, max_difficulty_gap=4)  # fmt: skip
    assert Reason.judge_incoherent not in a.failures(
        t.model_copy(update={"min_coherence": a.coherence})
    )
    if a.coherence < 5:
        stricter = t.model_copy(update={"min_coherence": a.coherence + 0.5})
        assert Reason.judge_incoherent in a.failures(stricter)
    gap = abs(a.difficulty - (case.difficulty or 0))
    if gap > 0:
        assert Reason.judge_difficulty in a.failures(
            t.model_copy(update={"max_difficulty_gap": gap - 0.5})
        )


def test_smollm2_judged_build_counts_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lax = {
        "enabled": True, "floor": 0.0, "require_agreement": False, "min_cue_direction": 0.0,
        "min_kind_agreement": 0.0, "min_distractor_own": 0.0, "min_coherence": 1.0,
        "max_difficulty_gap": 4.0, "require_problem_named": False, "mode": "filter",
    }  # fmt: skip
    cfg = Config(out=out, count=1, embedded_parallel=2, concurrency=2, judge=lax)
    first = asyncio.run(Run(cfg).run())
    assert first.accepted == 1
    # Two asks per judged record; in flight at the target, some are judged and dropped.
    judged = first.accepted + sum(n for r, n in first.rejected.items() if r.startswith("judge_"))
    assert first.judge_requests % 2 == 0 and first.judge_requests >= 2 * judged
    assert first.judge_completion_tokens > 0
    # Resume (the SIGKILL case is test_judged_build_survives_sigkill_...): the judged record
    # is restored as it was, not judged again, and the judge totals carry over.
    again = asyncio.run(Run(cfg).run())
    assert again.resumed == 1 and again.total == 1 and again.judge_requests == 0
    records = list(read(out))
    assert len(records) == 1
    assert records[0].quality.judged and records[0].quality.judge_model == EMBEDDED_MODEL
    totals = orjson.loads((out / "manifest.json").read_bytes())["totals"]
    assert totals["judge_requests"] == first.judge_requests
    assert totals["judge_completion_tokens"] == first.judge_completion_tokens
