"""The durable store: sharded JSONL, an atomic manifest, exactly-once resume.

Layout::

    OUT/manifest.json                    replaced atomically (tmp, fsync, rename, fsync dir)
    OUT/shards/part-000000.jsonl         closed shards: immutable, what readers read
    OUT/shards/part-000001.jsonl.open    the open shard: readers ignore it
    OUT/.lock                            the writer's pid (the lock: flock on OUT itself)
    OUT/quarantine/                      shards ``--repair`` set aside, noted in the manifest

The filesystem is the truth. On open, the store recovers the open shard (drops a torn
last line, keeps every complete one, and goes on appending to it), re-reads the closed
shards' ids, and carries on. A record is reported accepted only after ``flush`` has
fsynced it, so a record anyone saw reported survives SIGKILL, and resuming never writes
it twice. A shard is closed (renamed to ``part-NNNNNN.jsonl``) when it holds
``shard_records`` records or its first record is ``shard_age_s`` old; every closure and
every open writes the manifest.

Evidence stays: on open, every closed shard must match the manifest's checksum and no id
may be in two shards; otherwise the store refuses (``repair=True`` quarantines the shard)
before changing anything. A disk that fails (full, read-only, I/O error) raises
``DiskError``; what was reported is durable, the failed batch stays queued, and a later
``flush`` retries it. Stale temp files are removed at open.

Manifest ``state``: ``running`` while a writer has OUT open (or was killed), ``complete``
once a run closed the store with its target reached, ``stopped`` when a run closed it
early (signal, daemon stop). ``dreamgen.read(..., follow=True)`` ends on ``complete``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import ValidationError

from dreamgen.diskio import (
    DiskError,
    StoreError,
    atomic_write,
    disk_error,
    file_sha256,  # noqa: F401 (re-exported: callers import it from here)
    fsync_dir,
    lock_folder,
    probe_write,
    remove_stale_temps,
)
from dreamgen.errors import first_error
from dreamgen.idset import IdSet
from dreamgen.manifest import MANIFEST, check_compatible, read_manifest
from dreamgen.record import SCHEMA_VERSION, Record
from dreamgen.shards import (
    OPEN_SUFFIX,
    QUARANTINE,
    SHARDS,
    ShardInfo,
    ShardProblem,
    closed_shards,
    is_open_shard,
    quarantine,
    read_closed,
    recover_lines,
    shard_index,
    shard_name,
    stray_files,
    trim_open,
)
from dreamgen.version import __version__

log = logging.getLogger("dreamgen.store")

LOCK = ".lock"
STORE_FORMAT = 1


class Store:
    """Append-only sharded JSONL with a manifest; one writer per OUT folder (flock)."""

    def __init__(
        self,
        out: Path,
        *,
        config: dict[str, Any] | None = None,
        fingerprint: str = "",
        shard_records: int = 1000,
        shard_age_s: float = 600.0,
        force: bool = False,
        target: int | None = None,
        repair: bool = False,
    ) -> None:
        self.out = Path(out)
        self.shards_dir = self.out / SHARDS
        self.config = config or {}
        self.fingerprint = fingerprint
        self.shard_records = max(1, shard_records)
        self.shard_age_s = shard_age_s
        self.target = target
        self.repair = repair
        self.closed: list[ShardInfo] = []
        self.ids = IdSet()  # every durable id: compact, since stores reach millions
        self.pending: dict[str, bytes] = {}
        self.pending_records: list[Record] = []
        self.open_path = self.shards_dir / (shard_name(0) + OPEN_SUFFIX)
        self.open_count = 0
        self.open_bytes = 0
        self.open_first_at: float | None = None  # monotonic time of the shard's first record
        self.rotations = 0
        self.meta: dict[str, Any] = {}
        self.torn_bytes_dropped = 0
        self.torn_lines_dropped = 0
        # The last write failure (disk full, read-only, I/O error); None while writes work.
        self.failure: DiskError | None = None
        self._manifest_due = False  # a manifest write failed: retried before the next flush
        self._hash = hashlib.sha256()
        self._open_file: IO[bytes] | None = None
        self._lock_fd: int | None = None
        self._closed = False
        try:
            self._prepare(force)
        except BaseException:
            self._release()
            raise

    # -- opening and recovery ----------------------------------------------------------

    def _prepare(self, force: bool) -> None:
        try:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = lock_folder(self.out)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = (self.out / LOCK).read_text(errors="replace").strip()[:32]
            raise StoreError(
                f"{self.out} is being written by another dreamgen process"
                + (f" (pid {holder})" if holder else "")
                + "; one writer per output folder"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot write to {self.out}: {exc.strerror or exc}") from exc
        # The pid is only for the message above; the lock is the flock on the folder.
        with contextlib.suppress(OSError):
            (self.out / LOCK).write_text(f"{os.getpid()}\n")
        try:
            for tmp in remove_stale_temps(self.out, self.shards_dir):
                log.info("removed a stale temp file %s", tmp)
        except OSError as exc:
            raise disk_error(f"cleaning {self.out}", exc) from exc
        manifest = self.out / MANIFEST
        listed: dict[str, ShardInfo] = {}
        if manifest.exists():
            self.meta, listed = read_manifest(manifest)
            check_compatible(self.meta, self.out, self.config, self.fingerprint, force)
        # Verify everything before changing anything: nothing is truncated, renamed or
        # rewritten (the manifest least of all) while the folder may be evidence.
        for path in closed_shards(self.out):
            info = self._verify_closed(path, listed.pop(path.name, None))
            if info is not None:
                self.closed.append(info)
        for name in listed:  # listed, not on disk
            self._problem(self.shards_dir / name, "is listed in the manifest but missing")
        opens = sorted(
            (p for p in self.shards_dir.glob(f"part-*.jsonl{OPEN_SUFFIX}") if is_open_shard(p)),
            key=lambda p: shard_index(p.name),
        )
        recovered = []
        for path in opens:
            try:
                recovered.append((path, recover_lines(path)))
            except StoreError as exc:
                self._problem(path, str(exc).removeprefix(f"{path}: "))
        for stray in stray_files(self.out):
            log.warning("%s is not a shard: ignored (and not part of the dataset)", stray)
        try:
            for i, (path, lines) in enumerate(recovered):
                last = i == len(recovered) - 1 and shard_index(path.name) >= self._next_index()
                self._recover_open(path, lines, keep_open=last)
        except OSError as exc:
            raise disk_error(f"recovering the open shard in {self.shards_dir}", exc) from exc
        self.closed.sort(key=lambda s: shard_index(s.name))
        if self._open_file is None and self.open_count == 0:
            self._start_shard()
        recovery = self.meta.setdefault("recovery", {})
        recovery["opens"] = recovery.get("opens", 0) + 1
        recovery["torn_lines_dropped"] = (
            recovery.get("torn_lines_dropped", 0) + self.torn_lines_dropped
        )
        recovery["torn_bytes_dropped"] = (
            recovery.get("torn_bytes_dropped", 0) + self.torn_bytes_dropped
        )
        # Written before any record: the fingerprint guards OUT from the first line on.
        self.write_manifest(state="running")

    def _verify_closed(self, path: Path, listed: ShardInfo | None) -> ShardInfo | None:
        """The verified shard, or None if ``--repair`` quarantined it."""
        try:
            info, ids = read_closed(path, listed, self.ids)
        except ShardProblem as exc:
            self._problem(path, exc.reason)
            return None
        self.ids.update(ids)
        return info

    def _problem(self, path: Path, reason: str) -> None:
        """A shard that does not verify: refuse (one line), or quarantine it with a note."""
        if not self.repair:
            raise StoreError(
                f"{path}: {reason}; restore it, or resume with --repair to move it to "
                f"{self.out / QUARANTINE}/ and rebuild the counts from what verifies"
            )
        note: dict[str, Any] = {"shard": path.name, "reason": reason, "at": time.time()}
        if path.exists():
            try:
                note = quarantine(self.out, path, reason)
            except OSError as exc:
                raise disk_error(f"moving {path} to {QUARANTINE}/", exc) from exc
        log.warning("%s: %s: quarantined (%s)", path, reason, note.get("moved_to", "missing"))
        self.meta.setdefault("quarantine", []).append(note)

    def _recover_open(
        self, path: Path, recovered: tuple[list[bytes], int], *, keep_open: bool
    ) -> None:
        good, dropped = recovered
        if dropped:
            self.torn_bytes_dropped += dropped
            self.torn_lines_dropped += 1
            log.warning("%s: dropped a torn last line (%d bytes)", path, dropped)
        data, kept = trim_open(path, good, dropped, self.ids)
        if not kept:
            return
        if keep_open:  # go on appending to it: a restart does not leave a small shard
            self.open_path = path
            self._open_file = open(path, "ab", buffering=0)  # noqa: SIM115 (lives with the store)
            self.open_count = kept
            self.open_bytes = len(data)
            self._hash = hashlib.sha256(data)
            self.open_first_at = time.monotonic()
            return
        final = path.with_name(path.name.removesuffix(OPEN_SUFFIX))
        os.replace(path, final)
        fsync_dir(self.shards_dir)
        self.closed.append(
            ShardInfo(
                name=final.name,
                records=kept,
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
                closed_at=time.time(),
            )
        )

    def _next_index(self) -> int:
        return max((shard_index(s.name) for s in self.closed), default=-1) + 1

    def _start_shard(self) -> None:
        self.open_path = self.shards_dir / (shard_name(self._next_index()) + OPEN_SUFFIX)
        self._open_file = None  # created lazily: an idle daemon leaves no empty files
        self.open_count = 0
        self.open_bytes = 0
        self.open_first_at = None
        self._hash = hashlib.sha256()

    # -- writing -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Records durable in the store."""
        return len(self.ids)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.ids or record_id in self.pending

    def add(self, record: Record) -> bool:
        """Queue a record for the next flush; False if its id is already stored or queued."""
        if record.id in self:
            return False
        self.pending[record.id] = orjson.dumps(record.model_dump(mode="json")) + b"\n"
        self.pending_records.append(record)
        return True

    def flush(self) -> list[Record]:
        """Write and fsync queued records; returns them, now durable and safe to report.

        A shard never holds more than ``shard_records``: a batch that crosses the limit
        is split, the full shard closed, the rest written to the next. A failed write
        raises DiskError: the batch stays queued (unreported), the shard is cut back to
        its last durable byte, and a later ``flush`` retries (a daemon waits out a full
        disk this way).
        """
        if self._manifest_due:
            self.write_manifest()
        done: list[Record] = []
        while self.pending_records:
            if self.open_count >= self.shard_records:  # e.g. resumed with a smaller limit
                self.rotate()
            room = self.shard_records - self.open_count
            batch = self.pending_records[:room]
            self._append(b"".join(self.pending[r.id] for r in batch))
            for r in batch:
                del self.pending[r.id]
                self.ids.add(r.id)
            del self.pending_records[:room]
            done += batch
            self.open_count += len(batch)
            if self.open_first_at is None:
                self.open_first_at = time.monotonic()
            if self.open_count >= self.shard_records:
                self.rotate()
        self._maybe_rotate()
        self.failure = None
        return done

    def _fail(self, what: str, exc: OSError) -> DiskError:
        self.failure = disk_error(what, exc)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            log.error("%s", self.failure)
        return self.failure

    def _append(self, data: bytes) -> None:
        try:
            if self._open_file is None:
                # Unbuffered: after a failed write no stale bytes wait in a buffer.
                self._open_file = open(self.open_path, "ab", buffering=0)  # noqa: SIM115
                fsync_dir(self.shards_dir)
            f = self._open_file
            if self.failure is not None:
                f.truncate(self.open_bytes)  # a tail an earlier failure could not cut
            view = memoryview(data)
            while view:
                view = view[f.write(view) or 0 :]
            os.fsync(f.fileno())
        except OSError as exc:
            # Cut the partial batch off so the file stays a clean prefix; the records
            # stay queued and were not reported.
            if self._open_file is not None:
                with contextlib.suppress(OSError):
                    self._open_file.truncate(self.open_bytes)
            raise self._fail(f"writing {self.open_path}", exc) from exc
        self._hash.update(data)
        self.open_bytes += len(data)

    def _maybe_rotate(self) -> None:
        if self.open_count == 0 or self.open_first_at is None:
            return
        if time.monotonic() - self.open_first_at >= self.shard_age_s:
            self.rotate()

    def rotate(self) -> None:
        """Close the open shard (it becomes visible to readers) and start a new one."""
        if self.open_count == 0:
            return
        final = self.open_path.with_name(self.open_path.name.removesuffix(OPEN_SUFFIX))
        try:
            if self._open_file is not None:
                if self.failure is not None:
                    self._open_file.truncate(self.open_bytes)
                self._open_file.close()
                self._open_file = None
            os.replace(self.open_path, final)
            fsync_dir(self.shards_dir)
        except OSError as exc:
            raise self._fail(f"closing {self.open_path}", exc) from exc
        self.closed.append(
            ShardInfo(
                name=final.name,
                records=self.open_count,
                sha256=self._hash.hexdigest(),
                bytes=self.open_bytes,
                closed_at=time.time(),
            )
        )
        self.rotations += 1
        self._start_shard()
        self.write_manifest()

    def write_manifest(self, **extra: Any) -> None:
        """Replace the manifest atomically with the store's state plus ``extra`` sections.

        ``extra`` sections (totals, coverage, ...) are kept until replaced, so a write
        from the store itself (on rotation) carries the caller's latest ones. A failed
        write raises DiskError and leaves the old manifest (the shards are the truth;
        the next flush retries it).
        """
        now = time.time()
        self.meta.update(extra)
        self.meta.setdefault("created_at", now)
        self.meta.update(
            format=STORE_FORMAT,
            schema_version=SCHEMA_VERSION,
            dreamgen_version=__version__,
            fingerprint=self.fingerprint,
            config=self.config,
            target=self.target,
            records=self.count,
            shards=[s.model_dump() for s in self.closed],
            open_shard=(
                {"name": self.open_path.name, "records": self.open_count}
                if self.open_count
                else None
            ),
            updated_at=now,
        )
        self.meta.setdefault("state", "running")
        data = orjson.dumps(self.meta, option=orjson.OPT_INDENT_2)
        try:
            atomic_write(self.out / MANIFEST, data)
        except OSError as exc:
            self._manifest_due = True
            raise self._fail(f"writing {self.out / MANIFEST}", exc) from exc
        self._manifest_due = False

    def probe(self) -> str:
        """A real append in OUT (bytes, fsync): "" if it works, else why not (readiness)."""
        return probe_write(self.out)

    def close(self, **extra: Any) -> None:
        """Flush, close the open shard and write the final manifest; releases OUT.

        Raises DiskError if the disk refuses; what was reported is durable either way.
        """
        if self._closed:
            return
        try:
            self.flush()
            self.rotate()
            complete = self.target is not None and self.count >= self.target
            extra.setdefault("state", "complete" if complete else "stopped")
            self.write_manifest(**extra)
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        if self._open_file is not None:
            with contextlib.suppress(OSError):
                self._open_file.close()
            self._open_file = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        """Every durable record (closed shards, then the open one), in write order."""
        paths = [self.shards_dir / s.name for s in self.closed]
        if self.open_count and self.open_path.exists():
            paths.append(self.open_path)
        for path in paths:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        continue
                    try:
                        yield Record.model_validate_json(line)
                    except ValidationError as exc:
                        raise StoreError(
                            f"{path}:{n}: invalid record: {first_error(exc, 'record')}"
                        ) from None
