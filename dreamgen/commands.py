"""The ``export``, ``preview`` and ``cards init`` commands: thin typer wrappers.

``dreamgen.cli`` registers them; each does its work through library code
(``dreamgen.export``, ``dreamgen.preview``, ``dreamgen.cards``) and turns a user-causable
failure into one ``error:`` line with exit code 2 (``cli.fail``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer


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
    from dreamgen.cli import fail, out
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
    from dreamgen.cli import fail, out
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


def cards_init(
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="a new folder for the cards")],
    force: Annotated[bool, typer.Option(help="copy into a folder that is not empty")] = False,
) -> None:
    """Copy the shipped seed cards and templates into DIR, to edit (then --prompts DIR)."""
    from dreamgen.cards import PROMPTS_DIR, CardSet
    from dreamgen.cli import fail, out

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
