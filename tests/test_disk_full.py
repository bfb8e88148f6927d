"""Disks that fill: a real small tmpfs under the store, the CLI build and the daemon.

A full disk must stop a build with one ``error:`` line (exit 2), keep every record it
reported, and resume to the exact target once space is back; a daemon goes not-ready
with the reason, retries, and is ready again when space returns. Needs root for
``mount -t tmpfs``; skipped with the reason where the mount is refused.

The build and daemon tests keep the dedup index off the small disk (``[dedup] index``):
the store, its manifest and the run's side files fill it. The dedup index on a full disk
is ``test_dedup_index_on_a_full_disk``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fake_vllm import SimProcess
from test_daemon import daemon, wait_for
from test_store import make_record

from dreamgen.audit import audit
from dreamgen.store import SHARDS, DiskError, Store, StoreError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (unmounted after)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Write a filler file so that about ``leave`` bytes stay free; returns it."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as f:  # in chunks: a live writer shares the disk
        while free > leave:
            try:
                f.write(chunk)
                f.flush()
            except OSError:
                break
            free -= len(chunk)
    return filler


def durable_ids(out: Path) -> list[str]:
    """Every complete line's id on disk: closed shards and the open one."""
    ids = []
    for path in sorted((out / SHARDS).glob("part-*")):
        for line in path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                ids.append(orjson.loads(line)["id"])
    return ids


def test_store_on_a_full_disk_keeps_what_it_reported_and_resumes(tmpfs: Path) -> None:
    out = tmpfs / "out"
    store = Store(out, shard_records=40)
    filler = fill(tmpfs, 96 * 1024)
    reported: list[str] = []
    with pytest.raises(DiskError, match=r"No space left on device \(ENOSPC\)") as err:
        for i in range(10_000):
            store.add(make_record(i))
            if i % 10 == 9:
                reported += [r.id for r in store.flush()]
    assert isinstance(err.value, StoreError) and reported
    assert store.failure is not None
    # Everything reported is on disk, the open shard is a clean prefix (no torn tail).
    assert set(reported) <= set(durable_ids(out))
    with pytest.raises(DiskError):
        store.close()  # the disk is still full: it says so and releases OUT
    filler.unlink()
    resumed = Store(out, shard_records=40)
    assert all(x in resumed.ids for x in reported) and resumed.torn_lines_dropped == 0
    resumed.close()
    valid, problems = audit(out)
    assert problems == [] and valid == len(resumed.ids)


def test_a_failed_append_is_retried_by_the_next_flush(tmpfs: Path) -> None:
    out = tmpfs / "out"
    store = Store(out, shard_records=1000)
    filler = fill(tmpfs, 32 * 1024)
    queued = [make_record(i) for i in range(200)]
    for r in queued:
        store.add(r)
    with pytest.raises(DiskError):
        store.flush()
    assert store.count == 0 and len(store.pending) == 200  # nothing reported, all queued
    assert store.failure is not None
    filler.unlink()
    done = store.flush()  # space is back: the same batch goes through
    assert [r.id for r in done] == [r.id for r in queued] and store.failure is None
    store.close()
    assert audit(out) == (200, [])


def test_stale_temp_files_are_removed_at_open(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Store(out).close()
    stale = [out / ".manifest.json.999999.tmp", out / SHARDS / ".part-000000.jsonl.open.1.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    Store(out).close()
    assert not any(p.exists() for p in stale)


# -- through the CLI and the daemon ----------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess("--profile", "stress") as sp:
        yield sp


def config(tmp: Path, sim: SimProcess, dedup: Path | None) -> Path:
    path = tmp / "dreamgen.toml"
    text = f'engine = "openai"\nservers = ["{sim.url}"]\nmodel = "{sim.model}"\n'
    if dedup is not None:
        text += f'[dedup]\nindex = "{dedup}"\n'
    path.write_text(text)
    return path


def build(cfg: Path, out: Path, count: int) -> subprocess.CompletedProcess[str]:
    args = ["build", "--count", str(count), "--seed", "1", "--quiet", "--out", str(out)]
    args += ["--config", str(cfg)]
    return subprocess.run(
        [sys.executable, "-m", "dreamgen", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


def full_disk_build(tmp_path: Path, tmpfs: Path, sim: SimProcess, dedup: Path | None) -> None:
    out = tmpfs / "out"
    cfg = config(tmp_path, sim, dedup)
    filler = fill(tmpfs, 400 * 1024)
    proc = build(cfg, out, 300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    assert "ENOSPC" in lines[0] and "records are durable" in lines[0]
    said = int(re.search(r"(\d+) records are durable", lines[0]).group(1))  # type: ignore[union-attr]
    before = durable_ids(out)
    assert said == len(before)
    filler.unlink()
    proc = build(cfg, out, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = durable_ids(out)
    assert set(before) <= set(after) and len(after) == len(set(after))
    valid, problems = audit(out)
    assert problems == [] and valid == len(after)
    m = orjson.loads((out / "manifest.json").read_bytes())
    assert m["state"] == "complete" and m["last_run"]["resumed"] + m["last_run"]["accepted"] == 300


def test_build_on_a_full_disk_stops_with_one_line_and_resumes(
    tmp_path: Path, tmpfs: Path, sim
) -> None:
    full_disk_build(tmp_path, tmpfs, sim, tmp_path / "dedup")


def test_dedup_index_on_a_full_disk(tmp_path: Path, tmpfs: Path, sim) -> None:
    full_disk_build(tmp_path, tmpfs, sim, None)


def test_daemon_goes_not_ready_on_a_full_disk_and_recovers(
    tmp_path: Path, tmpfs: Path, sim
) -> None:
    out = tmpfs / "out"
    with daemon(tmp_path, config(tmp_path, sim, tmp_path / "dedup"), out) as d:
        d.wait_ready(60)
        wait_for(lambda: d.value("dreamgen_store_records") > 0, 60, "first records")
        filler = fill(tmpfs, 64 * 1024)
        _, body = wait_for(
            lambda: (r := d.get("/readyz"))[0] == 503 and "store not writable" in r[1] and r,
            60,
            "/readyz 503 for the full disk",
        )
        assert "No space left on device" in body
        assert d.proc.poll() is None  # still up
        stuck = d.value("dreamgen_store_records")
        filler.unlink()
        d.wait_ready(90)
        wait_for(lambda: d.value("dreamgen_store_records") > stuck + 5, 60, "records again")
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert "Traceback" not in log and "never retrieved" not in log
    assert log.count("store not writable, pausing") <= 3  # logged per episode, not per write
    valid, problems = audit(out)
    assert problems == [] and valid == len(durable_ids(out))
