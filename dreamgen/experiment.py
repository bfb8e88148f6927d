"""The attention experiment, end to end: train W_q on a build, probe a held-out set.

``run_experiment`` takes (or builds) a training dataset of Records, trains only the query
projections under each requested objective (``dreamgen.objectives``), and probes the
decision query's attention before and after on a held-out labelled set that shares no id,
group or message text with the training data (checked before any model is loaded). Every
objective starts from the same base weights. ``OUT`` gets::

    report.json                      per objective: heldout.<measure> {before, after, diff,
                                     ci_low, ci_high, n, per_layer}, train.loss,
                                     changed_parameters, verdict; settings; timings
    base/probe.json, base/probe.png  the probe of the untrained model
    <objective>/compare.json|.png    before/after per layer with 95% CIs
    <objective>/loss.png             the training loss per step
    <objective>/probe/               the probe after training
    <objective>/qproj.safetensors    the trained q_proj (``dreamgen probe --qproj``)
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from dreamgen.decision import Conversation, ConversationError, overlap, read_conversations
from dreamgen.objectives import OBJECTIVES, Objective, TrainResult, TrainSettings, train_qproj
from dreamgen.probe import MetricChange, ProbeResult, compare, probe
from dreamgen.record import Record
from dreamgen.version import __version__

Log = Callable[[str], None]


class ExperimentError(ValueError):
    """The experiment cannot run as asked (bad input, overlap, no data): one line."""


class ExperimentConfig(BaseModel):
    """Everything one run needs."""

    data: Path
    heldout: Path
    out: Path
    model: str = "smollm2"
    objectives: list[Objective] = Field(default_factory=lambda: list(OBJECTIVES), min_length=1)
    train: TrainSettings = TrainSettings()
    device: str = "cpu"
    dtype: str | None = None
    n_boot: int = Field(default=2000, ge=100)
    heldout_limit: int | None = Field(default=None, ge=1)
    train_limit: int | None = Field(default=None, ge=1)
    build_count: int | None = Field(default=None, ge=1)  # build/resume DATA to this first
    build_seed: int = 0
    # which splits of DATA train; the held-out set is separate, so a bench may take all
    train_splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)


class Verdict(BaseModel):
    """The acceptance bar, read off the overall held-out changes."""

    share_rises: bool  # direction share diff > 0 with the 95% CI above 0
    lift_rises: bool  # cue-vs-control lift diff > 0
    lift_ci_above_zero: bool
    meets_bar: bool  # share_rises and lift_rises


class ObjectiveReport(BaseModel):
    """One objective's training and its held-out effect."""

    objective: Objective
    heldout: dict[str, MetricChange]
    train: TrainResult
    changed_parameters: list[str]
    qproj: str
    verdict: Verdict
    probe_seconds: float


class Report(BaseModel):
    """``report.json``."""

    dreamgen_version: str
    model: str
    device: str
    data: str
    heldout: str
    n_train: int
    n_heldout: int
    disjoint: str
    settings: TrainSettings
    n_boot: int
    base_direction_share: list[float | None]
    base_control_lift: list[float | None]
    objectives: dict[str, ObjectiveReport]
    seconds: float

    def write(self, out: Path) -> Path:
        """Write ``out/report.json``."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(self.model_dump_json(indent=1))
        return out / "report.json"


def stderr_log(message: str) -> None:
    """Progress lines on stderr, flushed (visible under nohup and in CI logs)."""
    print(message, file=sys.stderr, flush=True)


def load_inputs(cfg: ExperimentConfig, log: Log) -> tuple[list[Record], list[Conversation]]:
    """The training records and the held-out conversations, checked disjoint."""
    from dreamgen.reader import read
    from dreamgen.store import StoreError

    try:
        heldout = read_conversations(cfg.heldout)
    except ConversationError as exc:
        raise ExperimentError(f"--heldout: {exc}") from None
    heldout = heldout[: cfg.heldout_limit]
    if not heldout:
        raise ExperimentError(f"--heldout {cfg.heldout}: no conversations")
    if cfg.build_count is not None:
        import dreamgen

        log(f"building {cfg.build_count} records into {cfg.data} (embedded engine unless set)")
        dreamgen.generate(cfg.build_count, out=cfg.data, seed=cfg.build_seed)
    if not cfg.data.exists():
        raise ExperimentError(f"{cfg.data}: no such file or folder (build it, or --build N)")
    try:
        records = list(read(cfg.data))
    except (StoreError, ValueError, OSError) as exc:
        raise ExperimentError(f"training data: {exc}") from None
    train = [r for r in records if r.split in cfg.train_splits][: cfg.train_limit]
    if not train:
        splits = ", ".join(cfg.train_splits)
        raise ExperimentError(f"{cfg.data}: no training records (split {splits})")
    problems = overlap([Conversation.from_record(r) for r in train], heldout)
    if problems:
        raise ExperimentError(
            f"the held-out set is not disjoint from the training data: {len(problems)} "
            f"conversation(s), first {problems[0]}"
        )
    return train, heldout


def param_digests(model: Any) -> dict[str, str]:
    """A content hash of every parameter (exact: any change in any element shows)."""
    import torch

    out: dict[str, str] = {}
    for name, param in model.named_parameters():
        data = param.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        out[name] = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
    return out


def verdict(heldout: dict[str, MetricChange]) -> Verdict:
    """Read the acceptance bar off the overall changes."""
    share, lift = heldout["direction_share"], heldout["control_lift"]
    share_rises = share.diff is not None and share.diff > 0 and (share.ci_low or 0.0) > 0
    lift_rises = lift.diff is not None and lift.diff > 0
    lift_ci = lift_rises and (lift.ci_low or 0.0) > 0
    return Verdict(
        share_rises=share_rises,
        lift_rises=lift_rises,
        lift_ci_above_zero=lift_ci,
        meets_bar=share_rises and lift_rises,
    )


def run_experiment(
    cfg: ExperimentConfig, log: Log = stderr_log, *, loaded: tuple[Any, Any] | None = None
) -> Report:
    """Run the whole loop and write ``cfg.out``; return the report.

    ``loaded`` is an already loaded ``(model, tokenizer)`` of ``cfg.model`` to use instead
    of loading it; it is left with its base weights and frozen.
    """
    import torch

    from dreamgen.plots import loss_plot
    from dreamgen.qproj import qproj_names, save_qproj
    from dreamgen.training import load_model

    started = time.monotonic()
    train, heldout = load_inputs(cfg, log)
    log(f"{len(train)} training records, {len(heldout)} held-out conversations (disjoint)")
    model, tokenizer = loaded or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    names = qproj_names(model, cfg.train.layers)
    if not names:
        raise ExperimentError(f"{cfg.model} has no q_proj in layers {cfg.train.layers}")
    params = dict(model.named_parameters())
    base_q = {n: params[n].detach().clone() for n in names}
    base_digests = param_digests(model)

    def measure(label: str) -> ProbeResult:  # the same probe before and after each objective
        name = f"{cfg.model} ({label})"
        return probe(
            model, heldout, tokenizer=tokenizer, name=name, sink_tokens=cfg.train.sink_tokens
        )

    t0 = time.monotonic()
    base = measure("base")
    base.write(cfg.out / "base")
    log(f"base probe: {time.monotonic() - t0:.1f} s")
    reports: dict[str, ObjectiveReport] = {}
    for objective in cfg.objectives:
        with torch.no_grad():
            for n, tensor in base_q.items():
                params[n].copy_(tensor)

        on_step = _progress(log, objective)
        result = train_qproj(model, tokenizer, train, objective, cfg.train, on_step=on_step)
        t0 = time.monotonic()
        after = measure(objective)
        probe_s = time.monotonic() - t0
        reports[objective] = _objective_report(
            cfg, model, base, after, result, base_digests, probe_s
        )
        save_qproj(model, cfg.out / objective / "qproj.safetensors", result.trained, cfg.model)
        loss_plot(result.loss, cfg.out / objective / "loss.png", f"{objective} loss")
        share = reports[objective].heldout["direction_share"]
        log(
            f"{objective}: direction share {share.before} -> {share.after} "
            f"(diff {share.diff}, 95% CI [{share.ci_low}, {share.ci_high}])"
        )
    with torch.no_grad():  # leave the model as it was loaded
        for n, tensor in base_q.items():
            params[n].copy_(tensor)
    report = Report(
        dreamgen_version=__version__,
        model=cfg.model,
        device=cfg.device,
        data=str(cfg.data),
        heldout=str(cfg.heldout),
        n_train=len(train),
        n_heldout=len(heldout),
        disjoint="ids, group ids and user/assistant/response texts checked: none shared",
        settings=cfg.train,
        n_boot=cfg.n_boot,
        base_direction_share=base.layer_mean("direction_share"),
        base_control_lift=base.layer_mean("control_lift"),
        objectives=reports,
        seconds=round(time.monotonic() - started, 1),
    )
    report.write(cfg.out)
    return report


def _progress(log: Log, objective: str) -> Callable[[int, int, float], None]:
    """A step callback that logs the loss, seconds per step and the ETA."""
    started = time.monotonic()

    def on_step(step: int, total: int, loss: float) -> None:
        per_step = (time.monotonic() - started) / step
        log(
            f"train {objective}: step {step}/{total} loss {loss:.4f} "
            f"({per_step:.1f} s/step, eta {per_step * (total - step):.0f} s)"
        )

    return on_step


def _objective_report(
    cfg: ExperimentConfig,
    model: Any,
    base: ProbeResult,
    after: ProbeResult,
    result: TrainResult,
    base_digests: dict[str, str],
    probe_s: float,
) -> ObjectiveReport:
    folder = cfg.out / result.objective
    after.write(folder / "probe")
    diff = compare(base, after, n_boot=cfg.n_boot, seed=cfg.train.seed)
    diff.write(folder)
    digests = param_digests(model)
    changed = sorted(n for n, d in digests.items() if d != base_digests[n])
    return ObjectiveReport(
        objective=result.objective,
        heldout=diff.metrics,
        train=result,
        changed_parameters=changed,
        qproj=f"{result.objective}/qproj.safetensors",
        verdict=verdict(diff.metrics),
        probe_seconds=round(probe_s, 2),
    )


def format_report(report: Report) -> str:
    """One line per objective: the headline measures overall, and the verdict."""
    lines = [
        f"experiment on {report.model}: {report.n_train} training records, "
        f"{report.n_heldout} held-out conversations, {report.seconds} s"
    ]
    for name, obj in report.objectives.items():
        cells = []
        for measure in ("direction_share", "control_lift"):
            m = obj.heldout[measure]
            cells.append(
                f"{measure} {_num(m.before)} -> {_num(m.after)} ({_num(m.diff, '+.4f')} "
                f"[{_num(m.ci_low, '+.4f')}, {_num(m.ci_high, '+.4f')}], n={m.n})"
            )
        loss = f"loss {obj.train.loss[0]:.3f} -> {obj.train.loss[-1]:.3f}"
        bar = "meets the bar" if obj.verdict.meets_bar else "does not meet the bar"
        lines.append(f"{name:>5}: {'; '.join(cells)}; {loss}; {bar}")
    return "\n".join(lines)


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def parse_layers(spec: str | None) -> list[int] | None:
    """``"0-9,12"`` -> ``[0, 1, ..., 9, 12]``; None or ``"all"`` -> None (every layer)."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: list[int] = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ExperimentError(f"layers must look like 0-9,12, not {spec!r}") from None
        if first < 0 or last < first:
            raise ExperimentError(f"bad layer range {part.strip()!r} in {spec!r}")
        out.extend(range(first, last + 1))
    return sorted(set(out))


def experiment_cli(
    data: Path,
    heldout: Path,
    out: Path,
    *,
    objective: str = "all",
    layers: str | None = None,
    attn_layers: str | None = None,
    build: int | None = None,
    model: str = "smollm2",
    device: str = "cpu",
    dtype: str | None = None,
    **train: Any,
) -> Report:
    """``dreamgen experiment``: validate the options, run, print the summary."""
    from pydantic import ValidationError

    from dreamgen.errors import first_error

    if objective == "all":
        objectives: list[str] = list(OBJECTIVES)
    elif objective in OBJECTIVES:
        objectives = [objective]
    else:
        raise ExperimentError(f"--objective must be one of lm, pref, attn, all, not {objective!r}")
    try:
        settings = TrainSettings(
            layers=parse_layers(layers), attn_layers=parse_layers(attn_layers), **train
        )
        cfg = ExperimentConfig(
            data=data,
            heldout=heldout,
            out=out,
            model=model,
            objectives=objectives,
            train=settings,
            device=device,
            dtype=dtype,
            build_count=build,
        )
    except ValidationError as exc:
        raise ExperimentError(first_error(exc)) from None
    report = run_experiment(cfg)
    print(format_report(report))
    print(f"report: {out / 'report.json'}")
    return report
