"""The attention experiment as a benchmark: all three objectives, one run, held-out dev set.

Trains only q_proj of SmolLM2-135M-Instruct (CPU) on records built by the embedded engine,
under each objective (lm, pref, attn), and probes the decision query before and after on
the project's hand-written held-out set ``tests/data/dev.jsonl``. Prints, per objective,
the overall and per-layer direction-share change with 95% CIs, the cue-vs-control lift,
the training loss, and whether the acceptance bar is met; writes the report folder.

    .venv/bin/python bench/experiment.py                 # full (sized for <= 15 min, 2 cores)
    .venv/bin/python bench/experiment.py --smoke         # 2 steps, 6 held-out: mechanics only

The training data folder (``--data``, default /tmp/exp-data) is built with
``dreamgen build`` if it is missing and reused otherwise. The settings below were fixed
before the first held-out measurement; they are not tuned on the held-out set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamgen.experiment import ExperimentConfig, Report, format_report, run_experiment  # noqa: E402
from dreamgen.objectives import TrainSettings  # noqa: E402

DEV = ROOT / "tests" / "data" / "dev.jsonl"
FULL = TrainSettings(steps=24, batch_size=4, lr=3e-4, max_length=384, attn_lambda=1.0)
SMOKE = TrainSettings(steps=2, batch_size=2, lr=3e-4, max_length=384)


def ensure_data(data: Path, count: int) -> None:
    """Build the training folder with the embedded engine unless it holds records."""
    if list(data.glob("shards/part-*.jsonl")):
        return
    print(f"building {count} records into {data} (embedded SmolLM2; slow, poor but valid)")
    cmd = [sys.executable, "-m", "dreamgen", "build", "--count", str(count), "--out", str(data),
           "--seed", "0", "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)


def per_layer_table(report: Report) -> str:
    """Per layer: direction-share change [95% CI] for each objective."""
    names = list(report.objectives)
    lines = ["layer " + "".join(f"{n + ' share diff [95% CI]':>34}" for n in names)]
    for layer in range(len(report.base_direction_share)):
        cells = []
        for name in names:
            row = report.objectives[name].heldout["direction_share"].per_layer[layer]
            if row.diff is None:
                cells.append(f"{'-':>34}")
            else:
                cells.append(f"{row.diff:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}]".rjust(34))
        lines.append(f"{layer:5d} " + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Report:
    """Run the benchmark; print the tables; return the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/exp-data"))
    p.add_argument("--count", type=int, default=24, help="records to build if --data is missing")
    p.add_argument("--out", type=Path, default=Path("/tmp/exp-report"))
    p.add_argument("--smoke", action="store_true", help="2 steps, 6 held-out conversations")
    p.add_argument("--objectives", default="lm,pref,attn")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    ensure_data(args.data, args.count)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load before the run: {load}")
    cfg = ExperimentConfig(
        data=args.data,
        heldout=DEV,
        out=args.out,
        objectives=args.objectives.split(","),
        train=SMOKE if args.smoke else FULL,
        heldout_limit=6 if args.smoke else None,
        n_boot=2000,
        train_splits=["train", "eval", "probe"],  # the held-out set is dev.jsonl, not a split
    )
    started = time.monotonic()
    report = run_experiment(cfg)
    print(per_layer_table(report))
    print(format_report(report))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load after the run: {load}; wall {time.monotonic() - started:.0f} s")
    print(f"report: {args.out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
