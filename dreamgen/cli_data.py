"""The commands that check, show and reshape data: ``validate``, ``schema``, ``coverage``,
``view``, ``report``, ``cards``, ``export``, ``preview`` and ``label``.

Thin typer wrappers over library code, registered on ``dreamgen.cli.app`` when imported;
a user-causable failure is one ``error:`` line with exit code 2 (``cli.fail``).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dreamgen.cards import CardSet, lint
from dreamgen.cli import (
    CardsOpt,
    PromptsOpt,
    app,
    cards_app,
    console,
    coverage_table,
    fail,
    install_signals,
    out,
)
from dreamgen.config import Config, load_config


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


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(metavar="OUT", help="an output folder (or JSONL)")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="trl-sft | trl-dpo | sharegpt | openai-chat | hf")
    ],
    dest: Annotated[Path, typer.Option("--to", help="the export folder")],
    force: Annotated[bool, typer.Option(help="replace an earlier export in --to")] = False,
    push_to_hub: Annotated[
        str | None, typer.Option(help="then upload to this Hub dataset repo (user/name)")
    ] = None,
    private: Annotated[bool, typer.Option(help="a private Hub repo (with --push-to-hub)")] = False,
) -> None:
    """Export OUT's records as a format trainers take as they are, with a dataset card."""
    from dreamgen.export import ExportError, export
    from dreamgen.export import push_to_hub as push

    try:
        result = export(source, fmt, dest, force=force)
    except ExportError as exc:
        fail(str(exc))
    counts = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    out.print(f"exported {result.total} records as {fmt} to {dest} ({counts})", highlight=False)
    out.print(f"dataset card: {dest / 'README.md'}", highlight=False)
    if push_to_hub:
        try:
            url = push(dest, push_to_hub, private=private)
        except ExportError as exc:
            fail(f"{exc} (the export in {dest} is complete)")
        out.print(f"pushed: {url}", highlight=False)


@app.command("preview")
def preview_cmd(
    count: Annotated[int, typer.Option(help="scenarios to show")] = 3,
    server: Annotated[list[str] | None, typer.Option(help="OpenAI-compatible server URL")] = None,
    model: Annotated[str | None, typer.Option(help="served model name")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    prompts: Annotated[Path | None, typer.Option(help="seed cards folder")] = None,
    card: Annotated[str | None, typer.Option(help="only this card id")] = None,
    seed: Annotated[int | None, typer.Option(help="planner seed")] = None,
    attempts: Annotated[int, typer.Option(help="model calls at most (default 4 × count)")] = 0,
) -> None:
    """Generate a few scenarios and print them, spans marked; writes nothing to disk."""
    from dreamgen.config import load_config
    from dreamgen.preview import PreviewError, preview

    cfg = load_config(
        config,
        servers=server or None,
        model=model,
        prompts=prompts,
        engine="openai" if server else None,
        **{"plan.seed": seed},
    )
    try:
        preview(cfg, count, out, card=card, attempts=attempts or 4 * count)
    except PreviewError as exc:
        fail(str(exc))


@cards_app.command("init")
def cards_init(
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="a new folder for the cards")],
    force: Annotated[bool, typer.Option(help="copy into a folder that is not empty")] = False,
) -> None:
    """Copy the shipped seed cards and templates into DIR, to edit (then --prompts DIR)."""
    from dreamgen.cards import PROMPTS_DIR, CardSet

    if dest.exists() and not dest.is_dir():
        fail(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        fail(f"{dest} is not empty (--force copies over files of the same name)")
    try:
        shutil.copytree(PROMPTS_DIR, dest, dirs_exist_ok=True)
    except OSError as exc:
        fail(f"cannot copy the cards to {dest}: {exc.strerror or exc}")
    n = len(CardSet.load(dest).cards)
    out.print(f"copied {n} cards and their templates to {dest}", highlight=False)
    out.print(f"edit or add cards there, then: dreamgen build --prompts {dest}", highlight=False)
