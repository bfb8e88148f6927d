"""The durable store: torn-line recovery, rotation, manifest, refusal, exactly-once resume."""

from __future__ import annotations

import random
import time
from pathlib import Path

import conftest
import orjson
import pytest
from cli import dreamgen
from fake_vllm import SimProcess

from dreamgen.audit import audit
from dreamgen.record import Record
from dreamgen.store import MANIFEST, SHARDS, Store, StoreError, file_sha256, recover_lines

ROOT = Path(__file__).resolve().parent.parent
_VOCAB = [f"w{i}" for i in range(2000)]


def make_record(
    i: int,
    *,
    group: str | None = None,
    split: str = "train",
    difficulty: int = 2,
    cue_kind: str = "constraint",
    seed: int = 0,
) -> Record:
    """A valid record with its own random words (no two are near-duplicates)."""
    rng = random.Random(f"{seed}-{i}")
    words = " ".join(rng.choices(_VOCAB, k=60))
    cue = "keep it simple"
    return conftest.make_record(
        [("user", f"Record {i}: {words}. Please {cue}.")],
        f"Simple it is ({i}). {words[:80]}",
        f"Let us rewrite it all ({i}).",
        [(0, cue)],
        rid=None,
        kind="c",
        axes={"cue_kind": cue_kind, "emotion": "tired"},
        difficulty=difficulty,
        split=split,
        group_id=group or f"g{i}",
    )


def line(record: Record) -> bytes:
    return orjson.dumps(record.model_dump(mode="json")) + b"\n"


# -- torn lines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda rec: line(rec)[:57], id="cut-mid-line"),
        pytest.param(lambda rec: line(rec)[:-1], id="cut-before-newline"),
        pytest.param(lambda rec: b'{"id": "abc", "mess\n', id="torn-write-whose-newline-landed"),
        pytest.param(lambda rec: b"\x00" * 300, id="zero-filled-tail"),
    ],
)
def test_torn_last_line_is_dropped_and_complete_lines_kept(tmp_path: Path, tail) -> None:
    out = tmp_path / "out"
    (out / SHARDS).mkdir(parents=True)
    recs = [make_record(i) for i in range(4)]
    good = b"".join(line(r) for r in recs[:3])
    shard = out / SHARDS / "part-000000.jsonl.open"
    shard.write_bytes(good + tail(recs[3]))

    store = Store(out)
    assert store.count == 3 and all(r.id in store.ids for r in recs[:3])
    assert shard.read_bytes() == good  # cut back to the complete lines, in place
    assert store.meta["recovery"]["torn_lines_dropped"] == 1
    assert store.add(recs[3]) and not store.add(recs[0])
    assert [r.id for r in store.flush()] == [recs[3].id]
    store.close()

    closed = out / SHARDS / "part-000000.jsonl"  # the recovered shard went on and closed
    assert not shard.exists() and closed.read_bytes() == good + line(recs[3])
    assert audit(out) == (4, [])


def test_open_shard_with_only_a_torn_line_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / SHARDS).mkdir(parents=True)
    shard = out / SHARDS / "part-000000.jsonl.open"
    shard.write_bytes(line(make_record(0))[:100])
    store = Store(out)
    assert store.count == 0 and not shard.exists()
    store.close()
    assert audit(out) == (0, [])


def test_corruption_before_the_last_line_is_refused(tmp_path: Path) -> None:
    shard = tmp_path / "part-000000.jsonl.open"
    shard.write_bytes(line(make_record(0)) + b"garbage\n" + line(make_record(1)))
    with pytest.raises(StoreError, match="line 2 is corrupt"):
        recover_lines(shard)


# -- rotation and manifest ----------------------------------------------------------------


def test_rotation_by_count_splits_a_batch_exactly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = Store(out, shard_records=3)
    for i in range(7):
        store.add(make_record(i))
    assert len(store.flush()) == 7
    names = sorted(p.name for p in (out / SHARDS).iterdir())
    assert names == ["part-000000.jsonl", "part-000001.jsonl", "part-000002.jsonl.open"]
    manifest = orjson.loads((out / MANIFEST).read_bytes())  # written at each closure
    assert [s["records"] for s in manifest["shards"]] == [3, 3]
    for s in manifest["shards"]:
        assert s["sha256"] == file_sha256(out / SHARDS / s["name"])
    store.close()
    manifest = orjson.loads((out / MANIFEST).read_bytes())
    assert [s["records"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["records"] == 7 and manifest["open_shard"] is None


def test_rotation_by_age_counts_from_the_first_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = Store(out, shard_age_s=0.3)
    time.sleep(0.4)  # idle: no shard, no rotation, no empty files
    assert store.flush() == [] and list((out / SHARDS).iterdir()) == []
    store.add(make_record(0))
    store.flush()
    assert store.rotations == 0  # the age counts from the first record, not the open
    time.sleep(0.35)
    store.flush()  # the pipeline's flush loop calls this even when nothing is queued
    assert store.rotations == 1
    assert [p.name for p in (out / SHARDS).iterdir()] == ["part-000000.jsonl"]
    store.close()


def test_manifest_says_what_the_store_holds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = {"model": "m", "sampling": {"temperature": 0.3}}
    store = Store(out, config=config, fingerprint="f1", target=2)
    assert orjson.loads((out / MANIFEST).read_bytes())["state"] == "running"
    for i in range(2):
        store.add(make_record(i))
    store.flush()
    store.close(totals={"rejected": {"schema": 3}, "prompt_tokens": 10}, coverage=[])
    m = orjson.loads((out / MANIFEST).read_bytes())
    assert m["schema_version"] == 1 and m["dreamgen_version"]
    assert m["config"] == config and m["fingerprint"] == "f1"
    assert m["records"] == 2 and m["target"] == 2 and m["state"] == "complete"
    assert m["totals"]["rejected"] == {"schema": 3} and m["coverage"] == []
    assert m["created_at"] <= m["updated_at"]
    assert [s["name"] for s in m["shards"]] == ["part-000000.jsonl"]
    assert not list(out.glob(".*.tmp"))  # atomic replace leaves no temp file

    # Reopened with a higher target and closed early: "stopped", created_at kept.
    store = Store(out, config=config, fingerprint="f1", target=5)
    store.close()
    m2 = orjson.loads((out / MANIFEST).read_bytes())
    assert m2["state"] == "stopped" and m2["created_at"] == m["created_at"]
    assert m2["totals"] == m["totals"]  # sections from earlier runs are kept


# -- refusal, locking, exactly once ----------------------------------------------------------


def test_a_changed_config_is_refused_naming_the_field(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Store(out, config={"sampling": {"temperature": 0.3}, "model": "m"}, fingerprint="a").close()
    new = {"sampling": {"temperature": 0.9}, "model": "m"}
    with pytest.raises(StoreError, match=r"sampling\.temperature: 0\.3 -> 0\.9"):
        Store(out, config=new, fingerprint="b")
    store = Store(out, config=new, fingerprint="b", force=True)
    store.close()
    m = orjson.loads((out / MANIFEST).read_bytes())
    assert m["fingerprint"] == "b" and m["config_history"][0]["fingerprint"] == "a"


def test_only_one_writer_per_out(tmp_path: Path) -> None:
    first = Store(tmp_path / "out")
    with pytest.raises(StoreError, match="another dreamgen process"):
        Store(tmp_path / "out")
    first.close()
    Store(tmp_path / "out").close()  # released on close (and by the kernel on SIGKILL)


def test_resume_after_a_crash_repeats_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = Store(out, shard_records=4)
    recs = [make_record(i) for i in range(10)]
    for r in recs[:6]:
        store.add(r)
    store.flush()
    store.add(recs[6])  # queued, never flushed: never reported
    store._release()  # what SIGKILL leaves: files as they are, the lock dropped

    store = Store(out, shard_records=4)
    assert store.count == 6 and recs[6].id not in store
    assert [store.add(r) for r in recs] == [False] * 6 + [True] * 4
    store.flush()
    store.close()
    ids = [r.id for r in Store(out).records()]
    assert ids == [r.id for r in recs]
    assert audit(out) == (10, [])


# -- through the CLI -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim():
    with SimProcess("--profile", "stress") as sp:
        yield sp


def test_cli_refuses_a_changed_config_in_one_line(tmp_path: Path, sim) -> None:
    out = str(tmp_path / "out")
    args = ("--server", sim.url, "--model", sim.model, "--out", out, "--quiet")
    assert dreamgen("build", "--count", "5", "--seed", "1", *args).returncode == 0
    proc = dreamgen("build", "--count", "10", "--seed", "2", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "plan.seed: 1 -> 2" in lines[0] and "--force" in lines[0]
    assert dreamgen("build", "--count", "10", "--seed", "2", "--force", *args).returncode == 0


def test_cli_count_is_a_target_for_the_whole_out(tmp_path: Path, sim) -> None:
    out = tmp_path / "out"
    args = ("--server", sim.url, "--model", sim.model, "--out", str(out), "--quiet")
    for count in (30, 50, 40):
        proc = dreamgen("build", "--count", str(count), "--seed", "1", *args)
        assert proc.returncode == 0, proc.stderr
    m = orjson.loads((out / MANIFEST).read_bytes())
    assert m["records"] == 50 and m["state"] == "complete"
    assert m["last_run"]["resumed"] == 50 and m["last_run"]["accepted"] == 0
    assert audit(out) == (50, [])
