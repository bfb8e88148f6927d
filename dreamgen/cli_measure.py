"""The commands that measure: ``probe``, ``experiment``, ``judge-eval`` and ``label-eval``.

Thin typer wrappers over library code, registered on ``dreamgen.cli.app`` when imported;
a user-causable failure is one ``error:`` line with exit code 2 (``cli.fail``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dreamgen.cli import app, fail, out
from dreamgen.config import load_config


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
