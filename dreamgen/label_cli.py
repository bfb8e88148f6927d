"""What ``dreamgen label`` and ``dreamgen label-eval`` do at a terminal (cli.py wraps these).

Errors a user can cause come out as ``LabelCliError`` (one line); the CLI prints it as
``error: ...`` and exits 2. A bad input line is not fatal: it is printed as one
``error: FILE:LINE: ...`` line, recorded in ``rejected.jsonl``, and the run goes on; the
exit code is then 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dreamgen.config import ConfigError
from dreamgen.conversations import BadInput, InputError
from dreamgen.engines import EngineError
from dreamgen.label_eval import evaluate_files, headline, tables
from dreamgen.label_out import LABELLED
from dreamgen.label_run import LabelJob, LabelRun, LabelSummary
from dreamgen.labelled import LabelledError
from dreamgen.store import StoreError


class LabelCliError(Exception):
    """A one-line error for the CLI to print."""


def _summary_table(data: dict[str, Any]) -> Table:
    table = Table(title="label summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in data["totals"].items():
        table.add_row(key, str(value))
    for reason, n in data["rejected"].items():
        table.add_row(f"rejected: {reason}", str(n))
    for key in ("done_this_run", "elapsed_s", "conversations_per_s", "stopped_by"):
        table.add_row(key, str(data[key]))
    return table


Install = Callable[[asyncio.AbstractEventLoop, Callable[[], None]], None]


def run_label(job: LabelJob, err: Console, out: Console, install: Install) -> int:
    """Run one labelling job with signal handling; returns the exit code.

    ``install(loop, on_first)`` installs the CLI's signal handlers (first signal: stop
    reading, finish and write what is in flight; second: stop at once, what is durable
    stays).
    """

    def on_bad(item: BadInput) -> None:
        err.print(
            f"[bold red]error:[/] {escape(str(item))} (skipped)", highlight=False, soft_wrap=True
        )

    try:
        run = LabelRun(job, on_bad=on_bad)
    except (StoreError, ValueError) as exc:
        raise LabelCliError(str(exc)) from None

    async def main() -> LabelSummary:
        install(asyncio.get_running_loop(), lambda: run.stop("signal"))
        return await run.run()

    try:
        summary = asyncio.run(main())
    except KeyboardInterrupt:
        err.print(f"interrupted: what was reported is in {job.out / LABELLED}")
        return 130
    except (InputError, EngineError, ConfigError, StoreError) as exc:
        raise LabelCliError(f"{exc} (what was labelled before is kept in {job.out})") from None
    data = summary.as_dict()
    out.print(_summary_table(data))
    out.print(f"output: {job.out / LABELLED}", highlight=False, soft_wrap=True)
    if summary.stopped_by == "signal":
        return 130
    return 1 if data["rejected"].get("malformed_input") else 0


def run_label_eval(pred: Path, gold: Path, json_path: Path | None, out: Console) -> None:
    """Print the tables and, last, the headline line; write the JSON if asked."""
    for path in (pred, gold):
        if not path.exists():
            raise LabelCliError(f"{path}: no such file or folder")
    try:
        result = evaluate_files(pred, gold)
    except LabelledError as exc:
        raise LabelCliError(str(exc)) from None
    if json_path is not None:
        try:
            json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            raise LabelCliError(f"cannot write {json_path}: {exc.strerror or exc}") from None
    for table in tables(result):
        out.print(table)
    out.print(headline(result), highlight=False, soft_wrap=True)
