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
from dreamgen.cards import CardError
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


# The other commands register themselves on `app` when imported (they need it defined).
from dreamgen import cli_data, cli_measure  # noqa: E402, F401

if __name__ == "__main__":
    main()
