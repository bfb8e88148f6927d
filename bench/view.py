"""Benchmark `dreamgen view` on large synthetic stores: first open, page loads, viewer RSS.

    .venv/bin/python bench/view.py --sizes 10000,100000,1000000 --dir /tmp/viewbench

The store grows through the sizes (each step appends closed shards), and at each size a
viewer is started on a fresh cache (a first open) and then again on the cache it left (a
reopen). Records are synthetic but valid (``Record`` validates a sample of them): words
drawn from the bench corpus, spans at exact offsets, random axes, lineage for a third,
written straight to closed shards with a manifest (building 1M through the pipeline
would take hours on 2 cores). Figures: time until the viewer listens, until the first
list page answers, until the index holds every record; page latencies (median and p95 of
repeated requests, after indexing); the viewer's RSS (now and peak) from /proc.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dreamgen.record import Message as Msg  # noqa: E402
from dreamgen.record import Record, content_id  # noqa: E402
from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum  # noqa: E402

SHARD = 1000


def vocabulary() -> list[str]:
    text = (ROOT / "bench" / "corpus" / "scenarios.jsonl").read_text()
    return sorted(set(re.findall(r"[A-Za-z]{3,}", text)))


def synth(rng: random.Random, vocab: list[str], i: int, ids: list[str]) -> dict[str, Any]:
    def words(n: int) -> str:
        return " ".join(rng.choices(vocab, k=n))

    opening, idea, cue = words(25) + ".", words(12) + ".", words(8) + "."
    before = words(10) + ". "
    idea_turn = words(10) + ". " + idea + " " + words(6) + "."
    decision = before + cue + " " + words(5) + "."
    messages = [("user", opening), ("assistant", idea_turn), ("user", decision)]
    target, contrast = words(60) + ".", words(60) + " " + idea
    rid = content_id(
        [Msg(role=r, content=c) for r, c in messages],  # type: ignore[arg-type]
        Msg(role="assistant", content=target),
        Msg(role="assistant", content=contrast),
    )
    parent = rng.choice(ids[-500:]) if ids and rng.random() < 0.33 else ""
    cue_kind, dk = rng.choice(list(CueKind)).value, rng.choice(list(DistractorKind)).value
    return {
        "schema_version": 1,
        "id": rid,
        "messages": [{"role": r, "content": c} for r, c in messages],
        "target": {"role": "assistant", "content": target},
        "contrast": {"role": "assistant", "content": contrast},
        "cues": [
            {"message": 2, "start": len(before), "end": len(before) + len(cue), "kind": cue_kind,
             "text": cue}
        ],
        "distractors": [
            {"message": 1, "start": idea_turn.index(idea), "end": idea_turn.index(idea) + len(idea),
             "kind": dk, "text": idea}
        ],
        "axes": {
            "cue_kind": cue_kind, "distractor_kind": dk, "domain": rng.choice(list(Domain)).value,
            "emotion": rng.choice(list(Emotion)).value,
            "momentum": rng.choice(list(Momentum)).value,
        },
        "difficulty": rng.randint(1, 5),
        "split": rng.choice(["train"] * 8 + ["eval", "probe"]),
        "group_id": rid[:16],
        "parent_id": parent,
        "generation": 1 if parent else 0,
        "mode": "evolved" if parent else "directed",
        "provenance": {
            "card": f"card-{rng.randint(0, 19):02d}", "prompt_hash": "bench", "model": "synthetic",
            "engine": "bench", "dreamgen_version": "bench", "created_at": 1.7e9 + i,
        },
    }  # fmt: skip


def grow(out: Path, n: int, rng: random.Random, vocab: list[str], ids: list[str]) -> float:
    """Append closed shards until ``out`` holds ``n`` records; returns seconds taken."""
    t0 = time.perf_counter()
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    index = len(list(shards.glob("part-*.jsonl")))
    listed: list[dict[str, Any]] = []
    if (out / "manifest.json").exists():
        listed = orjson.loads((out / "manifest.json").read_bytes())["shards"]
    while len(ids) < n:
        lines = []
        for _ in range(min(SHARD, n - len(ids))):
            d = synth(rng, vocab, len(ids), ids)
            if len(ids) % 5000 == 0:
                Record.model_validate(d)  # the synthetic records are real records
            ids.append(d["id"])
            lines.append(orjson.dumps(d))
        data = b"\n".join(lines) + b"\n"
        name = f"part-{index:06d}.jsonl"
        (shards / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        listed.append({"name": name, "records": len(lines), "bytes": len(data), "sha256": digest})
        index += 1
    manifest = {"format": 1, "schema_version": 1, "records": len(ids), "shards": listed,
                "state": "complete", "coverage": []}  # fmt: skip
    (out / "manifest.json").write_bytes(orjson.dumps(manifest))
    return time.perf_counter() - t0


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def get(url: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
    return time.perf_counter() - t, body


def open_viewer(out: Path, cache: Path, pages: bool, ids: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dreamgen", "view", str(out), "--port", "0", "--cache", str(cache)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t_listen = time.perf_counter() - t0
    url = line.split(" at ", 1)[1].split()[0]
    first_page, _ = get(url)
    t_first = time.perf_counter() - t0
    rss_during = 0
    while True:
        status = orjson.loads(get(url + "api/status")[1])
        rss_during = max(rss_during, rss_kb(proc.pid)[0])
        if not status["building"]:
            break
        time.sleep(0.25)
    t_full = time.perf_counter() - t0
    res: dict[str, Any] = {
        "listen_s": round(t_listen, 3), "first_page_s": round(t_first, 3),
        "first_page_latency_ms": round(first_page * 1e3, 1), "index_complete_s": round(t_full, 2),
        "records_indexed": status["records"], "rss_during_kb": rss_during,
    }  # fmt: skip
    if pages:
        rng = random.Random(1)
        kinds = [k.value for k in CueKind]
        last_rid = status["records"] - 60
        word = "import"
        cases = {
            "list": lambda: url,
            "list ?cue_kind": lambda: f"{url}?cue_kind={rng.choice(kinds)}",
            "list ?cue_kind&domain&difficulty": lambda: (
                f"{url}?cue_kind={rng.choice(kinds)}&domain=operations&difficulty=5"
            ),
            "list deep page": lambda: f"{url}?after={last_rid}",
            "search ?q=word": lambda: f"{url}?q={word}",
            "search ?q=word&cue_kind": lambda: f"{url}?q={word}&cue_kind={rng.choice(kinds)}",
            "record": lambda: f"{url}r/{rng.choice(ids)}",
            "coverage": lambda: f"{url}coverage",
        }
        lat = {}
        for name, make in cases.items():
            times = [get(make())[0] * 1e3 for _ in range(25)]
            lat[name] = {
                "median_ms": round(statistics.median(times), 1),
                "p95_ms": round(sorted(times)[int(0.95 * len(times)) - 1], 1),
            }
        res["pages"] = lat
    res["rss_kb"], res["peak_rss_kb"] = rss_kb(proc.pid)
    proc.terminate()
    proc.wait(timeout=30)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dreamgen-viewbench"))
    ap.add_argument("--keep", action="store_true", help="keep the store and caches")
    a = ap.parse_args()
    out, rng, vocab, ids = a.dir / "out", random.Random(0), vocabulary(), []
    shutil.rmtree(a.dir, ignore_errors=True)
    print(f"load: {os.getloadavg()}", flush=True)
    results = []
    for n in (int(x) for x in a.sizes.split(",")):
        gen_s = grow(out, n, rng, vocab, ids)
        size = sum(p.stat().st_size for p in (out / "shards").iterdir())
        first = open_viewer(out, a.dir / f"cache-{n}", True, ids)
        again = open_viewer(out, a.dir / f"cache-{n}", False, ids)
        row = {"records": n, "store_mb": round(size / 2**20), "generate_s": round(gen_s, 1),
               "first_open": first, "reopen": again, "load": os.getloadavg()}  # fmt: skip
        results.append(row)
        print(orjson.dumps(row, option=orjson.OPT_INDENT_2).decode(), flush=True)
    Path(a.dir / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
