"""Throughput of the rules labeller (`dreamgen label --engine rules`), on one core.

Two figures, each the best of ``--repeat`` runs:
- **labeller**: find the decision point, split into segments, apply the rules, build and
  serialise the ``Labelled`` line (what the labeller itself costs per conversation);
- **end to end**: ``dreamgen label`` in-process over a JSONL file on disk: reading,
  labelling, appending, fsync per batch and the atomic checkpoint (``LabelRun``).

Conversations are the hand-written dev set's, each made distinct by a suffix, so no
cache could help. Pinned to one CPU (``os.sched_setaffinity``) where the OS allows it.

    .venv/bin/python bench/label_rules.py [--n 20000] [--repeat 3]

The last line is ``rules_conversations_per_s=R end_to_end_per_s=E`` (labeller, end to end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dreamgen.conversations import Conversation  # noqa: E402
from dreamgen.label_run import LabelJob, LabelRun, labelled_line, rules_hash  # noqa: E402
from dreamgen.labelled import read_labelled  # noqa: E402
from dreamgen.labeller import decision_turns, point_at, rules_labels  # noqa: E402


def conversations(n: int) -> list[list[dict[str, str]]]:
    dev = [
        [m.model_dump() for m in item.messages]
        for item in read_labelled(ROOT / "tests" / "data" / "dev.jsonl")
    ]
    out = []
    for i in range(n):
        messages = [dict(m) for m in dev[i % len(dev)]]
        messages[-1]["content"] += f" (ticket {i})"
        out.append(messages)
    return out


def bench_labeller(convs: list[list[dict[str, str]]]) -> float:
    job = LabelJob(Path("in.jsonl"), Path("out"))
    prov = {
        "labeller": "rules",
        "engine": "rules",
        "model": "rules-v1",
        "prompt_hash": rules_hash(),
        "input": "in.jsonl",
        "samples": 1,
        "dreamgen_version": "bench",
    }
    t0 = time.perf_counter()
    for i, messages in enumerate(convs):
        conv = Conversation(i, f"in.jsonl:{i + 1}", messages)
        for turn in decision_turns(messages):
            point = point_at(messages, turn, limit=None)
            labelled_line(job, conv, turn, point, rules_labels(point), prov, None)
    return len(convs) / (time.perf_counter() - t0)


def bench_end_to_end(convs: list[list[dict[str, str]]], tmp: Path, k: int) -> float:
    src = tmp / f"in{k}.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"messages": m}) + b"\n" for m in convs))
    t0 = time.perf_counter()
    summary = asyncio.run(LabelRun(LabelJob(src, tmp / f"out{k}", "rules")).run())
    elapsed = time.perf_counter() - t0
    assert summary.totals["labelled"] == len(convs), summary.as_dict()
    return len(convs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        pinned = "pinned to one CPU"
    except (AttributeError, OSError):
        pinned = "not pinned"
    convs = conversations(args.n)
    labeller = max(bench_labeller(convs) for _ in range(args.repeat))
    with tempfile.TemporaryDirectory() as tmp:
        e2e = max(bench_end_to_end(convs, Path(tmp), k) for k in range(args.repeat))
    print(f"{args.n} conversations, best of {args.repeat}, {pinned}, load {os.getloadavg()}")
    print(f"rules_conversations_per_s={labeller:.0f} end_to_end_per_s={e2e:.0f}")


if __name__ == "__main__":
    main()
