"""Evidence stays: a tampered closed shard stops a resume; ``--repair`` quarantines it.

Also: ids in two shards are refused, nothing rewrites the manifest before the folder has
verified, the lock is an flock on the folder (deleting ``.lock`` lets nobody in),
``validate`` tolerates a live writer and stray files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from test_store import line, make_record

from dreamgen.audit import audit
from dreamgen.store import LOCK, MANIFEST, QUARANTINE, SHARDS, Store, StoreError

ROOT = Path(__file__).resolve().parent.parent


def built(out: Path, n: int = 12, per_shard: int = 4) -> list[str]:
    """An OUT with ``n`` records in closed shards of ``per_shard``; returns the ids."""
    store = Store(out, shard_records=per_shard)
    recs = [make_record(i) for i in range(n)]
    for r in recs:
        store.add(r)
    store.flush()
    store.close()
    return [r.id for r in recs]


def shard(out: Path, i: int) -> Path:
    return out / SHARDS / f"part-{i:06d}.jsonl"


def test_an_edited_closed_shard_stops_a_resume_and_the_manifest_stays(tmp_path: Path) -> None:
    out = tmp_path / "out"
    built(out)
    path = shard(out, 1)
    path.write_bytes(path.read_bytes().replace(b"Simple it is", b"Simple it was"))
    manifest = (out / MANIFEST).read_bytes()
    with pytest.raises(StoreError, match=r"part-000001\.jsonl: differs from the manifest") as e:
        Store(out)
    assert "--repair" in str(e.value) and "\n" not in str(e.value)
    assert (out / MANIFEST).read_bytes() == manifest  # evidence: nothing was rewritten
    assert audit(out)[1]  # and validate still reports it
    Store(out, repair=True).close()
    assert not path.exists() and (out / QUARANTINE / path.name).exists()
    m = orjson.loads((out / MANIFEST).read_bytes())
    assert [q["shard"] for q in m["quarantine"]] == [path.name]
    assert "differs from the manifest" in m["quarantine"][0]["reason"]
    assert m["records"] == 8 and [s["name"] for s in m["shards"]] == [
        "part-000000.jsonl",
        "part-000002.jsonl",
    ]
    assert audit(out) == (8, [])
    Store(out).close()  # repaired: resumes without --repair


def test_a_line_duplicated_into_another_shard_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    built(out)
    dup = shard(out, 0).read_bytes().splitlines(keepends=True)[0]
    shard(out, 7).write_bytes(line(make_record(99)) + dup)  # unlisted: a crash's shape
    with pytest.raises(StoreError, match="duplicate id"):
        Store(out)
    store = Store(out, repair=True)
    assert store.count == 12 and (out / QUARANTINE / "part-000007.jsonl").exists()
    store.close()
    assert audit(out) == (12, [])


def test_a_broken_span_in_an_unlisted_shard_is_one_line_before_any_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    built(out)
    rec = orjson.loads(shard(out, 2).read_bytes().splitlines()[0])
    rec["cues"][0]["start"] += 1  # the span no longer matches its text
    shard(out, 5).write_bytes(orjson.dumps(rec) + b"\n")
    manifest = (out / MANIFEST).read_bytes()
    with pytest.raises(StoreError, match=r"part-000005\.jsonl: line 1: invalid record"):
        Store(out)
    assert (out / MANIFEST).read_bytes() == manifest


def test_a_listed_shard_that_vanished_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    built(out)
    shard(out, 0).unlink()
    with pytest.raises(StoreError, match="listed in the manifest but missing"):
        Store(out)
    Store(out, repair=True).close()
    m = orjson.loads((out / MANIFEST).read_bytes())
    assert m["records"] == 8 and m["quarantine"][0]["shard"] == "part-000000.jsonl"


@pytest.mark.parametrize(
    "manifest",
    [b"[]", b'{"shards": 5}', b'{"shards": [{"name": 1}]}', b'{"totals": {"rejected": 3}}'],
)
def test_a_manifest_of_the_wrong_shape_is_one_line(tmp_path: Path, manifest: bytes) -> None:
    out = tmp_path / "out"
    built(out)
    (out / MANIFEST).write_bytes(manifest)
    with pytest.raises(StoreError, match="manifest.json"):
        Store(out)
    valid, problems = audit(out)  # validate reports, never crashes
    assert valid == 12 and problems


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = Store(out)
    (out / LOCK).unlink()
    with pytest.raises(StoreError, match="another dreamgen process"):
        Store(out)
    first.close()
    Store(out).close()


def test_stray_files_are_reported_and_never_crash(tmp_path: Path) -> None:
    out = tmp_path / "out"
    built(out)
    (out / SHARDS / "part-abc.jsonl").write_bytes(b"{}\n")
    (out / SHARDS / "notes.txt").write_text("hello")
    valid, problems = audit(out)
    assert valid == 12
    assert sorted(p.split(":")[0] for p in problems) == [
        "shards/notes.txt",
        "shards/part-abc.jsonl",
    ]
    store = Store(out)  # the store ignores them too
    assert store.count == 12
    store.close()
    proc = subprocess.run(
        [sys.executable, "-m", "dreamgen", "validate", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout


def test_cli_build_on_a_tampered_out_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    built(out)
    path = shard(out, 0)
    path.write_bytes(path.read_bytes()[:-1] + b" \n")
    cmd = [sys.executable, "-m", "dreamgen", "build", "--count", "20", "--out", str(out)]
    cmd += ["--server", "http://127.0.0.1:9", "--model", "m", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "differs from the manifest" in lines[0]
    assert "--repair" in lines[0]


WRITER = """
import sys, time
sys.path.insert(0, "tests")
from test_store import make_record
from dreamgen.store import Store
store = Store(sys.argv[1], shard_records=1)
print("open", flush=True)
for i in range(int(sys.argv[2])):
    store.add(make_record(i))
    store.flush()
store.close()
"""


def test_validate_tolerates_a_live_writer(tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), "400"], cwd=ROOT, stdout=subprocess.PIPE
    )
    assert writer.stdout is not None and writer.stdout.readline() == b"open\n"
    runs = 0
    try:
        while writer.poll() is None:
            problems = audit(out)[1]
            assert problems == [], problems
            runs += 1
    finally:
        writer.kill()
        writer.wait()
    assert runs >= 5
    assert audit(out) == (400, [])
