"""The `dreamgen` command line: a thin layer over the library.

Every error a user can cause ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# typer ships its own copy of click; its exceptions live only there (typer >= 0.20).
from typer._click import exceptions as click_errors

from dreamgen.breaker import YieldError
from dreamgen.cards import CardError, CardSet, lint
from dreamgen.config import Config, ConfigError, load_config
from dreamgen.engines import EngineError
from dreamgen.pipeline import Run
from dreamgen.store import StoreError
from dreamgen.summary import Summary

HELP = {"help_option_names": ["-h", "--help"]}  # -h everywhere, subcommands included
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, context_settings=HELP)
cards_app = typer.Typer(
    no_args_is_help=True, help="List, show, lint and copy seed cards.", context_settings=HELP
)
app.add_typer(cards_app, name="cards")
console = Console(stderr=True)
out = Console()

USER_ERRORS = (ConfigError, CardError, StoreError, EngineError, YieldError)


def _print_version(value: bool) -> None:
    if value:
        from dreamgen.version import __version__

        out.print(f"dreamgen {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="print the version"
        ),
    ] = False,
) -> None:
    pass


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # Not standalone: a bad flag or value reaches us, to be one line like every error.
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:
        where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        console.print(
            f"[bold red]error:[/] {escape(exc.format_message())}{escape(where)}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except click_errors.ClickException as exc:  # e.g. a file option that cannot be opened
        console.print(f"[bold red]error:[/] {escape(exc.format_message())}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:  # an optional part not installed: name its extra
        from dreamgen.extras import missing_extra

        line = missing_extra(exc)
        if line is None:
            _internal(exc)
        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # a bug, not the user's doing: one line, the traceback in a file
        _internal(exc)
    sys.exit(code if isinstance(code, int) else 0)


def _internal(exc: BaseException) -> NoReturn:
    from dreamgen.crash import internal_error_line

    line = internal_error_line(exc, sys.argv)
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(1)


def summary_table(summary: dict[str, Any], title: str = "build summary") -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("total", "target", "resumed", "accepted", "requests", "yield"):
        table.add_row(key, str(summary[key]))
    for reason, n in summary["rejected"].items():
        table.add_row(f"rejected: {reason}", str(n))
    for key in (
        "prompt_tokens",
        "completion_tokens",
        "accepted_tokens",
        "completion_tokens_per_s",
        "accepted_tokens_per_s",
        "accepted_per_s",
        "elapsed_s",
        "stopped_by",
    ):
        table.add_row(key, str(summary[key]))
    if summary.get("judge_requests"):  # the judge's tokens, apart from generation's
        for key in ("judge_requests", "judge_prompt_tokens", "judge_completion_tokens"):
            table.add_row(key, str(summary[key]))
    return table


def coverage_table(coverage: list[dict[str, Any]]) -> Table:
    table = Table(title="coverage (filled / quota)")
    for col in ("cue_kind", "distractor_kind", "difficulty", "filled", "quota"):
        table.add_column(
            col, justify="right" if col in ("difficulty", "filled", "quota") else "left"
        )
    for row in coverage:
        table.add_row(
            *(str(row[c]) for c in ("cue_kind", "distractor_kind", "difficulty", "filled", "quota"))
        )
    return table


def install_signals(loop: asyncio.AbstractEventLoop, on_first: Callable[[], None]) -> None:
    """First SIGINT/SIGTERM: graceful stop. Second: stop at once (what is durable stays)."""
    hits = {"n": 0}

    def handler() -> None:
        hits["n"] += 1
        if hits["n"] == 1:
            console.print("stopping: finishing in-flight requests (signal again to stop now)")
            on_first()
        else:
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)


# `--cards DIR` (repeatable): more card folders, added to the library's cards.
CardsOpt = Annotated[
    list[Path] | None,
    typer.Option("--cards", help="a folder of more cards, added to the library (repeatable)"),
]
PromptsOpt = Annotated[
    Path | None, typer.Option(help="seed cards folder (default: the shipped library)")
]


@app.command()
def build(
    count: Annotated[int | None, typer.Option(help="target number of records in OUT")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output folder")] = None,
    seed: Annotated[int | None, typer.Option(help="planner seed")] = None,
    server: Annotated[list[str] | None, typer.Option(help="OpenAI-compatible server URL")] = None,
    model: Annotated[str | None, typer.Option(help="served model name")] = None,
    concurrency: Annotated[int | None, typer.Option(help="requests in flight")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    prompts: PromptsOpt = None,
    cards: CardsOpt = None,
    evolve: Annotated[float | None, typer.Option(help="share of requests that evolve")] = None,
    undirected: Annotated[float | None, typer.Option(help="share of undirected requests")] = None,
    difficulty: Annotated[str | None, typer.Option(help="range like 1-3")] = None,
    schedule: Annotated[str | None, typer.Option(help="uniform | broad_to_subtle")] = None,
    force: Annotated[bool, typer.Option(help="continue an OUT built with another config")] = False,
    repair: Annotated[
        bool, typer.Option(help="move shards that fail verification to OUT/quarantine/")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="print the summary as one JSON object on stdout")
    ] = False,
    progress_interval: Annotated[
        float, typer.Option(help="seconds between progress log lines when not on a terminal")
    ] = 10.0,
    launch: Annotated[
        str | None, typer.Option(help='start and supervise a server: "vllm serve MODEL …"')
    ] = None,
    judge: Annotated[
        bool | None, typer.Option("--judge/--no-judge", help="the LLM judge stage ([judge])")
    ] = None,
    executor: Annotated[
        str | None, typer.Option(help="local | ray: generation in Ray worker actors")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster: auto | HOST:PORT (default: start one)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray worker actors")] = None,
) -> None:
    """Build a dataset (resumable: COUNT is a target for the whole OUT)."""
    lo, hi = _difficulty(difficulty)
    cfg = load_config(
        config,
        count=count,
        out=out_dir,
        servers=server or None,
        model=model,
        concurrency=concurrency,
        engine="openai" if server or launch else None,
        prompts=prompts,
        extra_cards=cards,
        **{
            "serving.launch": launch,
            "plan.seed": seed,
            "plan.evolve_share": evolve,
            "plan.undirected_share": undirected,
            "plan.difficulty_min": lo,
            "plan.difficulty_max": hi,
            "plan.schedule": schedule,
            "judge.enabled": judge,
            "executor.kind": executor,
            "executor.ray_address": ray_address,
            "executor.workers": workers,
        },
    )
    summary = run_with_progress(
        cfg, force=force, quiet=quiet, repair=repair, interval_s=progress_interval
    )
    data = summary.as_dict()
    if json_out:
        import orjson

        sys.stdout.write(orjson.dumps({**data, "out": str(cfg.out)}).decode() + "\n")
        raise typer.Exit(130 if summary.stopped_by == "signal" else 0)
    out.print(summary_table(data))
    out.print(f"output: {cfg.out}")
    _print_coverage_and_report(summary.coverage, cfg.out)
    if summary.stopped_by == "signal":
        raise typer.Exit(130)


def _print_coverage_and_report(coverage: list[dict[str, Any]], out_dir: Path) -> None:
    from dreamgen.report import ReportError, build_report, coverage_grid

    out.print(coverage_grid(coverage))
    try:
        out.print(f"report: {build_report(out_dir)}", highlight=False, soft_wrap=True)
    except (ReportError, OSError) as exc:  # the data is written; a missing plot is no failure
        out.print(f"report: not written ({exc})", highlight=False, soft_wrap=True)


def _difficulty(value: str | None) -> tuple[int | None, int | None]:
    if not value:
        return None, None
    lo, _, hi = value.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        fail(f"--difficulty must look like 2 or 1-3, not {value!r}")
        raise


def run_with_progress(
    cfg: Config,
    *,
    force: bool = False,
    quiet: bool = False,
    repair: bool = False,
    interval_s: float = 10.0,
) -> Summary:
    """Run the pipeline with live progress (``dreamgen.progress``) and graceful signals."""
    from dreamgen.progress import Progress, mode_for

    run = Run(cfg, force=force, repair=repair)
    view = Progress(run, mode_for(console, quiet=quiet), interval_s=interval_s, console=console)

    async def main_async() -> Summary:
        install_signals(asyncio.get_running_loop(), lambda: run.stop("signal"))
        ticker = asyncio.create_task(view.follow())
        try:
            return await run.run()
        finally:
            ticker.cancel()

    with view:
        try:
            summary = asyncio.run(main_async())
        except KeyboardInterrupt:
            # Second signal: asyncio.run cancelled the run; its finally blocks flushed
            # and closed the store, so every record reported is on disk.
            console.print(f"interrupted: {run.store.count} records kept in {cfg.out}")
            raise typer.Exit(130) from None
    return summary


@app.command("validate")
def validate_cmd(path: Path) -> None:
    """Check a JSONL file or an output folder: schema, exact offsets, ids, manifest."""
    from dreamgen.audit import audit

    valid, problems = audit(path)
    for p in problems[:200]:
        out.print(p, highlight=False)
    if len(problems) > 200:
        out.print(f"... and {len(problems) - 200} more")
    out.print(f"{valid} valid records, {len(problems)} problems")
    if problems:
        raise typer.Exit(1)


@app.command()
def schema(check: Annotated[bool, typer.Option(help="fail if files drift")] = False) -> None:
    """Write schemas/*.schema.json from the pydantic models."""
    from dreamgen import schema_files

    if check:
        drifted = schema_files.drift()
        if drifted:
            fail(f"schemas drifted from the models: {', '.join(drifted)} (run: dreamgen schema)", 1)
        out.print("schemas up to date")
        return
    for path in schema_files.write():
        out.print(f"wrote {path}")


@app.command()
def coverage(path: Path) -> None:
    """Print the coverage table (filled vs quota per cell) of an output folder."""
    import orjson

    manifest = path / "manifest.json"
    if not manifest.exists():
        fail(f"{path} has no manifest.json (not a dreamgen output folder?)")
    try:
        data = orjson.loads(manifest.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        fail(f"{manifest}: not readable JSON ({exc})")
    rows = data.get("coverage", []) if isinstance(data, dict) else None
    keys = ("cue_kind", "distractor_kind", "difficulty", "filled", "quota")
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and all(k in r for k in keys) for r in rows
    ):
        fail(f"{manifest}: no coverage table in it (not a dreamgen manifest, or damaged)")
    out.print(coverage_table(rows))


@app.command()
def view(
    path: Annotated[Path, typer.Argument(help="an output folder")],
    port: Annotated[int, typer.Option(help="port (0: any free one)")] = 8765,
    host: Annotated[str, typer.Option(help="interface; not loopback only on purpose")] = (
        "127.0.0.1"
    ),
    cache: Annotated[Path | None, typer.Option(help="index folder (never inside OUT)")] = None,
) -> None:
    """Browse an output folder in a local, read-only web viewer (records, spans, coverage)."""
    from dreamgen.viewer import ViewerError, is_loopback, serve

    if not is_loopback(host):
        console.print(f"warning: serving {path} on {host}: reachable from other machines")

    def ready(url: str) -> None:
        out.print(f"serving {path} at {url} (Ctrl-C to stop)", highlight=False, soft_wrap=True)
        sys.stdout.flush()

    try:
        asyncio.run(serve(path, host=host, port=port, cache=cache, on_ready=ready))
    except ViewerError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="an output folder")],
    dest: Annotated[Path | None, typer.Option(help="where to write (default OUT/report)")] = None,
) -> None:
    """Write report.html (images embedded) and the PNGs of an output folder's plots."""
    from dreamgen.report import ReportError, build_report

    try:
        out.print(f"report: {build_report(path, dest)}", highlight=False, soft_wrap=True)
    except ReportError as exc:
        fail(str(exc))


def _card_set(prompts: Path | None, cards: list[Path] | None) -> CardSet:
    return CardSet.load(prompts or Config().prompts, cards or ())


@cards_app.command("list")
def cards_list(prompts: PromptsOpt = None, cards: CardsOpt = None) -> None:
    """List the seed cards."""
    cs = _card_set(prompts, cards)
    table = Table("id", "title", "domains", "cues", "distractors")
    for c in cs.cards:
        table.add_row(
            c.id,
            c.title,
            ", ".join(c.domains),
            ", ".join(c.cue_kinds),
            ", ".join(c.distractor_kinds),
        )
    out.print(table)


@cards_app.command("show")
def cards_show(card_id: str, prompts: PromptsOpt = None, cards: CardsOpt = None) -> None:
    """Show one card as YAML."""
    import yaml

    cs = _card_set(prompts, cards)
    if card_id not in cs.by_id:
        fail(f"no card {card_id!r}; cards: {', '.join(cs.by_id)}")
    out.print(
        yaml.safe_dump(cs.by_id[card_id].model_dump(mode="json"), sort_keys=False), highlight=False
    )


@cards_app.command("check")
def cards_check(prompts: PromptsOpt = None, cards: CardsOpt = None) -> None:
    """Lint every card and template; one line per problem, non-zero exit if any."""
    problems = lint(prompts or Config().prompts, cards or ())
    for p in problems:
        out.print(p, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    out.print(f"{len(_card_set(prompts, cards).cards)} cards OK")


@app.command()
def daemon(
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output folder")] = None,
    port: Annotated[int | None, typer.Option(help="health/metrics port (0: any)")] = None,
    grace: Annotated[float | None, typer.Option(help="drain seconds on SIGTERM")] = None,
    count: Annotated[int | None, typer.Option(help="stop at this many records")] = None,
    log_json: Annotated[bool, typer.Option(help="JSON-lines logs")] = False,
    force: Annotated[bool, typer.Option(help="continue an OUT built with another config")] = False,
) -> None:
    """Run as a service: generate until the target (or forever), reload on SIGHUP."""
    from dreamgen.daemon import run_daemon

    code = run_daemon(
        config,
        out=out_dir,
        port=port,
        grace_s=grace,
        count=count,
        log_format="json" if log_json else None,
        force=force,
    )
    raise typer.Exit(code)


@app.command()
def probe(
    model: Annotated[str, typer.Argument(help="HF name, local folder, .gguf file, or 'smollm2'")],
    data: Annotated[
        Path, typer.Argument(help="labelled-conversation JSONL, Record JSONL or an output folder")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="where probe.json/.png go")] = Path(
        "output/probe"
    ),
    limit: Annotated[int, typer.Option(help="conversations to probe")] = 64,
    compare: Annotated[
        str | None, typer.Option(help="an 'after' model, or a q_proj .safetensors on MODEL")
    ] = None,
    qproj: Annotated[
        Path | None, typer.Option(help="trained q_proj (.safetensors) to load on MODEL")
    ] = None,
) -> None:
    """Attention at the decision position on cue, distractor, control and sink tokens."""
    try:
        from dreamgen.probe import probe_cli
    except ImportError as exc:  # torch/transformers live in the `train` extra
        fail(f"the probe needs the train extra (pip install 'dreamgen[train]'): {exc}")
        raise
    try:
        probe_cli(model, data, out_dir, limit, compare, qproj)
    except (ValueError, OSError) as exc:
        fail(str(exc))


@app.command()
def experiment(
    data: Annotated[Path, typer.Argument(help="training Records: an output folder or JSONL")],
    heldout: Annotated[Path, typer.Option(help="held-out labelled conversations (JSONL)")],
    out_dir: Annotated[Path, typer.Option("--out", help="the report folder")],
    model: Annotated[str, typer.Option(help="HF name, folder, .gguf or smollm2")] = "smollm2",
    objective: Annotated[str, typer.Option(help="lm | pref | attn | all")] = "all",
    steps: Annotated[int, typer.Option(help="optimiser steps per objective")] = 40,
    layers: Annotated[str | None, typer.Option(help="q_proj layers to train: 0-9,12")] = None,
    attn_layers: Annotated[str | None, typer.Option(help="layers of the attn loss")] = None,
    attn_lambda: Annotated[float, typer.Option(help="weight of the attn loss")] = 1.0,
    optimizer: Annotated[str, typer.Option(help="adamw | apollo")] = "adamw",
    lr: Annotated[float, typer.Option(help="learning rate")] = 3e-4,
    batch_size: Annotated[int, typer.Option(help="records per step")] = 4,
    max_length: Annotated[int, typer.Option(help="tokens per training record")] = 384,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="e.g. bfloat16")] = None,
    build: Annotated[int | None, typer.Option(help="first build/resume DATA to N")] = None,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
) -> None:
    """Train only q_proj on DATA; probe before/after on a disjoint held-out set."""
    try:
        from dreamgen.experiment import experiment_cli
    except ImportError as exc:  # torch/transformers live in the `train` extra
        fail(f"the experiment needs the train extra (pip install 'dreamgen[train]'): {exc}")
        raise
    try:
        experiment_cli(
            data, heldout, out_dir, model=model, objective=objective, steps=steps,
            layers=layers, attn_layers=attn_layers, attn_lambda=attn_lambda,
            optimizer=optimizer, lr=lr, batch_size=batch_size, max_length=max_length,
            device=device, dtype=dtype, build=build, seed=seed,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        fail(str(exc))


@app.command()
def label(
    input_path: Annotated[Path, typer.Argument(metavar="IN", help="JSONL, Parquet/Arrow, folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (resumable)")],
    engine: Annotated[str, typer.Option(help="rules | embedded | openai")] = "embedded",
    server: Annotated[list[str] | None, typer.Option(help="OpenAI-compatible server URL")] = None,
    model: Annotated[str | None, typer.Option(help="served model name")] = None,
    concurrency: Annotated[int | None, typer.Option(help="requests in flight")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    column: Annotated[str | None, typer.Option(help="field holding the messages")] = None,
    input_format: Annotated[
        str, typer.Option("--format", help="auto | openai | sharegpt")
    ] = "auto",
    all_turns: Annotated[bool, typer.Option(help="label every decision turn")] = False,
    samples: Annotated[int, typer.Option(help="LLM answers per turn (2: confidence)")] = 2,
) -> None:
    """Find and label direction cues and distractors in conversations we did not write."""
    from dreamgen.label_cli import LabelCliError, run_label
    from dreamgen.label_run import LabelJob

    if server and engine == "embedded":
        engine = "openai"
    cfg = load_config(
        config,
        out=out_dir,
        servers=server or None,
        model=model,
        concurrency=concurrency,
        engine=None if engine == "rules" else engine,
    )
    try:
        job = LabelJob(input_path, out_dir, engine, cfg, column, input_format, all_turns, samples)
        code = run_label(job, console, out, install_signals)
    except (LabelCliError, ValueError) as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command("judge-eval")
def judge_eval_cmd(
    labelled: Annotated[Path, typer.Argument(help="labelled conversations (JSONL)")],
    config: Annotated[Path | None, typer.Option(help="TOML config file ([judge])")] = None,
    server: Annotated[str | None, typer.Option(help="the judge's server URL")] = None,
    model: Annotated[str | None, typer.Option(help="the judge's served model name")] = None,
    concurrency: Annotated[int, typer.Option(help="conversations judged at once")] = 4,
    limit: Annotated[int | None, typer.Option(help="judge only the first N")] = None,
    save: Annotated[Path | None, typer.Option(help="write the calibration file here")] = None,
) -> None:
    """Measure the judge on labelled conversations: pairwise accuracy, position bias, kinds."""
    from dreamgen.judge_eval import judge_eval
    from dreamgen.labelled import LabelledError

    cfg = load_config(config, **{"judge.server": server, "judge.model": model})
    try:
        judge_eval(
            labelled,
            cfg,
            concurrency=concurrency,
            limit=limit,
            save=save,
            emit=lambda line: out.print(line, highlight=False, soft_wrap=True),
        )
    except (LabelledError, OSError) as exc:
        fail(str(exc))


@app.command("label-eval")
def label_eval(
    pred: Annotated[Path, typer.Argument(help="predicted labels (JSONL or a label OUT folder)")],
    gold: Annotated[Path, typer.Argument(help="gold labels (JSONL)")],
    json_path: Annotated[Path | None, typer.Option("--json", help="write the result here")] = None,
) -> None:
    """Span P/R/F1, exact segments, kind and no-direction accuracy of PRED against GOLD."""
    from dreamgen.label_cli import LabelCliError, run_label_eval

    try:
        run_label_eval(pred, gold, json_path, out)
    except LabelCliError as exc:
        fail(str(exc))


from dreamgen.commands import cards_init, export_cmd, preview_cmd  # noqa: E402 (needs app)

app.command("export")(export_cmd)
app.command("preview")(preview_cmd)
cards_app.command("init")(cards_init)

if __name__ == "__main__":
    main()
