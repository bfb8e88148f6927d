"""Readers: filters, closed shards only, following a live build, splits by group, datasets."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from fake_vllm import SimProcess
from test_store import make_record

import dreamgen
from dreamgen.reader import read
from dreamgen.record import split_for
from dreamgen.store import MANIFEST, SHARDS, Store, StoreError

ROOT = Path(__file__).resolve().parent.parent


def test_filters_and_closed_shards_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = Store(out, shard_records=4)
    kinds = ["constraint", "correction"]
    recs = [
        make_record(i, split="eval" if i % 3 == 0 else "train", difficulty=1 + i % 5,
                    cue_kind=kinds[i % 2])
        for i in range(10)
    ]  # fmt: skip
    for r in recs:
        store.add(r)
    store.flush()  # 8 in two closed shards, 2 in the open one
    assert [r.id for r in read(out)] == [r.id for r in recs[:8]]
    assert [r.id for r in dreamgen.read(out, "eval")] == [r.id for r in recs[:8:3]]
    got = read(out, ["train"], min_difficulty=3, kinds="correction")
    want = [
        r.id
        for r in recs[:8]
        if r.split == "train" and r.difficulty >= 3 and r.axes.cue_kind == "correction"
    ]
    assert [r.id for r in got] == want
    store.close()
    assert len(list(read(out))) == 10
    assert len(list(read(out / SHARDS / "part-000000.jsonl"))) == 4  # one file works too


def test_an_invalid_line_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    r = make_record(0).model_dump(mode="json")
    r["cues"][0]["end"] += 1  # offsets no longer exact
    bad.write_bytes(orjson.dumps(make_record(1).model_dump(mode="json")) + b"\n"
                    + orjson.dumps(r) + b"\n")  # fmt: skip
    with pytest.raises(StoreError, match="bad.jsonl:2: invalid record"):
        list(read(bad))


def test_follow_ends_on_stop(tmp_path: Path) -> None:
    out = tmp_path / "out"  # does not exist yet: a follower may start before the writer
    stop = threading.Event()
    got: list[str] = []
    reader = threading.Thread(
        target=lambda: got.extend(r.id for r in read(out, follow=True, poll_s=0.05, stop=stop))
    )
    reader.start()
    store = Store(out, shard_records=2)
    recs = [make_record(i) for i in range(5)]
    for r in recs:
        store.add(r)
        store.flush()
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    while len(got) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got == [r.id for r in recs[:4]]  # the fifth sits in the open shard
    stop.set()
    reader.join(timeout=5)
    assert not reader.is_alive()
    store.close()


def build_cmd(sim: SimProcess, out: Path, count: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "dreamgen", "build", "--server", sim.url, "--model",
            sim.model, "--out", str(out), "--count", str(count), "--seed", "3",
            "--config", str(config), "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def evolving_build(tmp_path_factory: pytest.TempPathFactory):
    """A build with evolutions written while a follower reads it: (OUT, followed ids)."""
    tmp = tmp_path_factory.mktemp("follow")
    out, config = tmp / "out", tmp / "c.toml"
    config.write_text(
        "concurrency = 16\n[store]\nshard_records = 20\nflush_records = 4\n"
        "[plan]\nevolve_share = 0.5\n"
    )
    followed: list[str] = []
    deadline = time.monotonic() + 120
    reader = threading.Thread(
        target=lambda: followed.extend(
            r.id
            for r in read(out, follow=True, poll_s=0.05, stop=lambda: time.monotonic() > deadline)
        )
    )
    reader.start()
    with SimProcess("--profile", "8b", "--speedup", "10") as sim:
        proc = subprocess.run(
            build_cmd(sim, out, 200, config), capture_output=True, text=True, timeout=120, cwd=ROOT
        )
    assert proc.returncode == 0, proc.stderr
    reader.join(timeout=30)
    assert not reader.is_alive(), "the follower did not end when the build completed"
    return out, followed


def test_a_follower_reads_a_build_while_it_is_written(evolving_build) -> None:
    out, followed = evolving_build
    final = [r.id for r in read(out)]
    assert len(final) == 200 and followed == final  # every record, once, in order
    m = orjson.loads((out / MANIFEST).read_bytes())
    assert m["state"] == "complete" and len(m["shards"]) == 10


def test_splits_by_group_never_straddle(evolving_build) -> None:
    out, _ = evolving_build
    ratios = orjson.loads((out / MANIFEST).read_bytes())["config"]["splits"]
    records = list(read(out))
    by_group: dict[str, set[str]] = defaultdict(set)
    for r in records:
        by_group[r.group_id].add(r.split)
        assert r.split == split_for(r.group_id, ratios)
    assert all(len(s) == 1 for s in by_group.values())
    ids = {r.id: r for r in records}
    children = [r for r in records if r.parent_id in ids]
    assert children, "the build made no evolutions to check"
    for child in children:  # an evolution lands in its parent's group, so its split
        parent = ids[child.parent_id]
        assert child.group_id == parent.group_id and child.split == parent.split
    assert max(Counter(r.group_id for r in records).values()) > 1


def test_split_for_is_deterministic_and_follows_the_ratios() -> None:
    ratios = {"train": 0.8, "eval": 0.1, "probe": 0.1}
    got = Counter(split_for(f"group-{i}", ratios) for i in range(20000))
    assert got["train"] / 20000 == pytest.approx(0.8, abs=0.02)
    assert got["eval"] / 20000 == pytest.approx(0.1, abs=0.02)
    assert split_for("abc", ratios) == split_for("abc", ratios)
    assert {split_for(f"g{i}", {"train": 1.0}) for i in range(100)} == {"train"}


def test_hf_datasets_loads_the_shards(evolving_build, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out, _ = evolving_build
    # One shard per type shape: schema inference across files is what can break.
    first = out / SHARDS / "part-000000.jsonl"
    ds = datasets.load_dataset(
        "json", data_files=str(first), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.num_rows == 20 and set(ds.column_names) >= {"messages", "cues", "split"}


def test_hf_datasets_loads_a_store_whose_shards_differ_in_types(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out"
    store = Store(out, shard_records=3)
    roots = [make_record(i) for i in range(3)]
    children = [
        make_record(10 + i).model_copy(update={"parent_id": r.id, "group_id": r.group_id})
        for i, r in enumerate(roots)
    ]
    for r in roots + children:
        store.add(r)
    store.close()
    ds = datasets.load_dataset(
        "json",
        data_files=str(out / SHARDS / "*.jsonl"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.num_rows == 6
