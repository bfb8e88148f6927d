"""The durable store: sharded JSONL, an atomic manifest, exactly-once resume.

Layout::

    OUT/manifest.json                    replaced atomically (tmp, fsync, rename, fsync dir)
    OUT/shards/part-000000.jsonl         closed shards: immutable, what readers read
    OUT/shards/part-000001.jsonl.open    the open shard: readers ignore it
    OUT/.lock                            held (flock) by the one process writing OUT

The filesystem is the truth. On open, the store recovers the open shard (drops a torn
last line, keeps every complete one, and goes on appending to it), re-reads the closed
shards' ids, and carries on. A record is reported accepted only after ``flush`` has
fsynced it, so a record anyone saw reported survives SIGKILL, and resuming never writes
it twice. A shard is closed (renamed to ``part-NNNNNN.jsonl``) when it holds
``shard_records`` records or its first record is ``shard_age_s`` old; every closure and
every open writes the manifest.

Manifest ``state``: ``running`` while a writer has OUT open (or was killed), ``complete``
once a run closed the store with its target reached, ``stopped`` when a run closed it
early (signal, daemon stop). ``dreamgen.read(..., follow=True)`` ends on ``complete``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import BaseModel, ConfigDict

from dreamgen import __version__
from dreamgen.record import SCHEMA_VERSION, Record

log = logging.getLogger("dreamgen.store")

MANIFEST = "manifest.json"
SHARDS = "shards"
OPEN_SUFFIX = ".open"
LOCK = ".lock"
STORE_FORMAT = 1


class StoreError(Exception):
    """The output folder cannot be used (unwritable, a different run's config, corrupt)."""


class ShardInfo(BaseModel):
    """A closed shard as the manifest lists it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    records: int
    sha256: str
    bytes: int
    closed_at: float | None = None


def shard_name(index: int) -> str:
    return f"part-{index:06d}.jsonl"


def shard_index(name: str) -> int:
    """``part-000042.jsonl[.open]`` → 42."""
    return int(name.split("-", 1)[1].split(".", 1)[0])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writers never share one
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recover_lines(path: Path) -> tuple[list[bytes], int]:
    """The complete, valid lines of an open shard and how many bytes of torn tail were dropped.

    A crash can leave a partial last line (no newline, or not valid JSON): it was never
    reported accepted, so dropping it loses nothing. The good lines are always a prefix
    of the file, so recovery is a truncation. Corruption before the last line is not a
    crash's doing: it raises StoreError.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty, or a torn line
    good: list[bytes] = []
    dropped = len(tail)
    for i, line in enumerate(lines):
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            if i == len(lines) - 1:  # a torn write whose newline landed: still the tail
                dropped += len(line) + 1
                continue
            raise StoreError(f"{path}: line {i + 1} is corrupt (not a torn tail)") from None
        good.append(line)
    return good, dropped


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
    ) -> None:
        self.out = Path(out)
        self.shards_dir = self.out / SHARDS
        self.config = config or {}
        self.fingerprint = fingerprint
        self.shard_records = max(1, shard_records)
        self.shard_age_s = shard_age_s
        self.target = target
        self.closed: list[ShardInfo] = []
        self.ids: set[str] = set()
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
            self._lock_fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write to {self.out}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            raise StoreError(
                f"{self.out} is being written by another dreamgen process"
                + (f" (pid {holder})" if holder else "")
                + "; one writer per output folder"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        manifest = self.out / MANIFEST
        if manifest.exists():
            try:
                self.meta = orjson.loads(manifest.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise StoreError(f"{manifest} is not valid JSON: {exc}") from exc
            self._check_compatible(force)
        listed = {s["name"]: s for s in self.meta.get("shards", []) if isinstance(s, dict)}
        for path in sorted(self.shards_dir.glob("part-*.jsonl")):
            self.closed.append(self._load_closed(path, listed.get(path.name)))
        opens = sorted(self.shards_dir.glob(f"part-*.jsonl{OPEN_SUFFIX}"), key=lambda p: p.name)
        for i, path in enumerate(opens):
            last = i == len(opens) - 1 and shard_index(path.name) >= self._next_index()
            self._recover_open(path, keep_open=last)
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

    def _check_compatible(self, force: bool) -> None:
        old_schema = self.meta.get("schema_version")
        if old_schema is not None and old_schema != SCHEMA_VERSION and not force:
            raise StoreError(
                f"{self.out} holds records of schema version {old_schema}; this dreamgen "
                f"writes version {SCHEMA_VERSION}; use another --out"
            )
        old = self.meta.get("fingerprint")
        if not (old and self.fingerprint and old != self.fingerprint):
            return
        changed = _diff(self.meta.get("config", {}), self.config) or (
            "the seed cards or prompt templates changed"
        )
        if not force:
            raise StoreError(
                f"{self.out} was built with a different config ({changed}); "
                "use another --out, or --force to continue with the new config"
            )
        history = self.meta.setdefault("config_history", [])
        history.append(
            {"fingerprint": old, "config": self.meta.get("config"), "replaced_at": time.time()}
        )
        log.warning("%s: continuing with a changed config (%s)", self.out, changed)

    def _load_closed(self, path: Path, listed: dict[str, Any] | None) -> ShardInfo:
        data = path.read_bytes()
        count = 0
        for n, line in enumerate(data.splitlines(), 1):
            try:
                rid = orjson.loads(line)["id"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise StoreError(f"{path}:{n}: corrupt line in a closed shard") from None
            self.ids.add(rid)
            count += 1
        if data and not data.endswith(b"\n"):
            raise StoreError(f"{path}: closed shard does not end with a newline")
        digest = _sha(data)
        if listed is not None and listed.get("sha256") not in (None, digest):
            log.warning("%s: checksum differs from the manifest; using the file", path)
        closed_at = listed.get("closed_at") if listed is not None else None
        return ShardInfo(
            name=path.name, records=count, sha256=digest, bytes=len(data), closed_at=closed_at
        )

    def _recover_open(self, path: Path, *, keep_open: bool) -> None:
        good, dropped = recover_lines(path)
        if dropped:
            self.torn_bytes_dropped += dropped
            self.torn_lines_dropped += 1
            log.warning("%s: dropped a torn last line (%d bytes)", path, dropped)
        kept: list[bytes] = []
        for line in good:
            rid = orjson.loads(line)["id"]
            if rid not in self.ids:  # never expected: add() refuses known ids
                self.ids.add(rid)
                kept.append(line)
        if not kept:
            path.unlink()
            fsync_dir(self.shards_dir)
            return
        data = b"".join(line + b"\n" for line in kept)
        if len(kept) == len(good):  # the usual case: cut the torn tail off in place
            if dropped:
                with open(path, "r+b") as f:
                    f.truncate(len(data))
                    f.flush()
                    os.fsync(f.fileno())
        else:
            atomic_write(path, data)
        if keep_open:  # go on appending to it: a restart does not leave a small shard
            self.open_path = path
            self._open_file = open(path, "ab")  # noqa: SIM115 (lives with the store)
            self.open_count = len(kept)
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
                records=len(kept),
                sha256=_sha(data),
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
        is split, the full shard closed, the rest written to the next.
        """
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
        return done

    def _append(self, data: bytes) -> None:
        if self._open_file is None:
            self._open_file = open(self.open_path, "ab")  # noqa: SIM115
            fsync_dir(self.shards_dir)
        f = self._open_file
        pos = f.tell()
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            # Disk full or similar: cut the partial batch off so the file stays a clean
            # prefix; the records stay queued and were not reported.
            with contextlib.suppress(OSError):
                f.truncate(pos)
                f.seek(pos)
            raise
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
        if self._open_file is not None:
            self._open_file.close()
            self._open_file = None
        final = self.open_path.with_name(self.open_path.name.removesuffix(OPEN_SUFFIX))
        os.replace(self.open_path, final)
        fsync_dir(self.shards_dir)
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
        from the store itself (on rotation) carries the caller's latest ones.
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
        atomic_write(self.out / MANIFEST, orjson.dumps(self.meta, option=orjson.OPT_INDENT_2))

    def close(self, **extra: Any) -> None:
        """Flush, close the open shard and write the final manifest; releases OUT."""
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
                for line in f:
                    if line.endswith(b"\n"):
                        yield Record.model_validate_json(line)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    changes: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(changes)
