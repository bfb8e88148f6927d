"""The durable store: sharded JSONL, an atomic manifest, exactly-once resume.

Layout::

    OUT/manifest.json               replaced atomically (tmp, fsync, rename, fsync dir)
    OUT/shards/part-000000.jsonl    closed shards: immutable
    OUT/shards/part-000001.jsonl.open   the open shard: readers ignore it

The filesystem is the truth. On open, the store recovers the open shard (drops a torn
last line, keeps every complete one), re-reads the closed shards' ids, and carries on;
a record is reported accepted only after ``flush`` has fsynced it, so a record anyone
saw reported survives SIGKILL, and resuming never writes it twice.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from dreamgen import __version__
from dreamgen.record import SCHEMA_VERSION, Record

MANIFEST = "manifest.json"
SHARDS = "shards"
OPEN_SUFFIX = ".open"


class StoreError(Exception):
    """The output folder cannot be used (unwritable, a different run's config, corrupt)."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    records: int
    sha256: str
    bytes: int


def shard_name(index: int) -> str:
    return f"part-{index:06d}.jsonl"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
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
    reported accepted, so dropping it loses nothing.
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
    """Append-only sharded JSONL with a manifest; one writer per OUT folder."""

    def __init__(
        self,
        out: Path,
        *,
        config: dict[str, Any] | None = None,
        fingerprint: str = "",
        shard_records: int = 1000,
        shard_age_s: float = 600.0,
        force: bool = False,
    ) -> None:
        self.out = Path(out)
        self.shards_dir = self.out / SHARDS
        self.config = config or {}
        self.fingerprint = fingerprint
        self.shard_records = shard_records
        self.shard_age_s = shard_age_s
        self.closed: list[ShardInfo] = []
        self.ids: set[str] = set()
        self.pending: list[bytes] = []
        self.pending_records: list[Record] = []
        self.open_count = 0
        self.open_since = time.monotonic()
        self.rotations = 0
        self.meta: dict[str, Any] = {}
        self.torn_bytes_dropped = 0
        self._open_file: Any = None
        self._prepare(force)

    # -- opening and recovery ----------------------------------------------------------

    def _prepare(self, force: bool) -> None:
        try:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"cannot write to {self.out}: {exc.strerror or exc}") from exc
        manifest = self.out / MANIFEST
        if manifest.exists():
            try:
                self.meta = orjson.loads(manifest.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise StoreError(f"{manifest} is not valid JSON: {exc}") from exc
            old = self.meta.get("fingerprint")
            if old and self.fingerprint and old != self.fingerprint and not force:
                changed = _diff(self.meta.get("config", {}), self.config)
                raise StoreError(
                    f"{self.out} was built with a different config ({changed}); "
                    "use another --out, or --force to continue with the new config"
                )
        for path in sorted(self.shards_dir.glob("part-*.jsonl")):
            count = 0
            with open(path, "rb") as f:
                for line in f:
                    self.ids.add(orjson.loads(line)["id"])
                    count += 1
            self.closed.append(
                ShardInfo(
                    name=path.name,
                    records=count,
                    sha256=file_sha256(path),
                    bytes=path.stat().st_size,
                )
            )
        opens = sorted(self.shards_dir.glob(f"part-*.jsonl{OPEN_SUFFIX}"))
        for path in opens:
            self._recover_open(path)
        self._start_shard()

    def _recover_open(self, path: Path) -> None:
        good, dropped = recover_lines(path)
        self.torn_bytes_dropped += dropped
        kept: list[bytes] = []
        for line in good:
            rid = orjson.loads(line)["id"]
            if rid not in self.ids:  # a crash between rename and manifest can repeat nothing
                self.ids.add(rid)
                kept.append(line)
        if not kept:
            path.unlink()
            return
        final = path.with_name(path.name.removesuffix(OPEN_SUFFIX))
        data = b"".join(line + b"\n" for line in kept)
        atomic_write(path, data)
        os.replace(path, final)
        fsync_dir(self.shards_dir)
        self.closed.append(
            ShardInfo(name=final.name, records=len(kept), sha256=_sha(data), bytes=len(data))
        )

    def _next_index(self) -> int:
        names = [s.name for s in self.closed]
        return max((int(n[5:11]) for n in names), default=-1) + 1

    def _start_shard(self) -> None:
        self.open_path = self.shards_dir / (shard_name(self._next_index()) + OPEN_SUFFIX)
        self._open_file = None  # created lazily: an idle daemon leaves no empty files
        self.open_count = 0
        self.open_since = time.monotonic()

    # -- writing -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Records durable in the store."""
        return len(self.ids)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.ids or any(r.id == record_id for r in self.pending_records)

    def add(self, record: Record) -> bool:
        """Queue a record for the next flush; False if its id is already stored or queued."""
        if record.id in self:
            return False
        self.pending.append(orjson.dumps(record.model_dump(mode="json")) + b"\n")
        self.pending_records.append(record)
        return True

    def flush(self) -> list[Record]:
        """Write and fsync queued records; returns them, now durable and safe to report."""
        if not self.pending:
            self._maybe_rotate()
            return []
        if self._open_file is None:
            self._open_file = open(self.open_path, "ab")
            fsync_dir(self.shards_dir)
        self._open_file.write(b"".join(self.pending))
        self._open_file.flush()
        os.fsync(self._open_file.fileno())
        done = self.pending_records
        for r in done:
            self.ids.add(r.id)
        self.open_count += len(done)
        self.pending, self.pending_records = [], []
        self._maybe_rotate()
        return done

    def _maybe_rotate(self) -> None:
        if self.open_count == 0:
            return
        aged = time.monotonic() - self.open_since >= self.shard_age_s
        if self.open_count >= self.shard_records or aged:
            self.rotate()

    def rotate(self) -> None:
        """Close the open shard (it becomes visible to readers) and start a new one."""
        if self._open_file is None or self.open_count == 0:
            return
        self._open_file.close()
        self._open_file = None
        final = self.open_path.with_name(self.open_path.name.removesuffix(OPEN_SUFFIX))
        os.replace(self.open_path, final)
        fsync_dir(self.shards_dir)
        self.closed.append(
            ShardInfo(
                name=final.name,
                records=self.open_count,
                sha256=file_sha256(final),
                bytes=final.stat().st_size,
            )
        )
        self.rotations += 1
        self._start_shard()

    def write_manifest(self, **extra: Any) -> None:
        """Replace the manifest atomically with the store's state plus ``extra`` sections."""
        now = time.time()
        self.meta.update(extra)
        self.meta.update(
            schema_version=SCHEMA_VERSION,
            dreamgen_version=__version__,
            fingerprint=self.fingerprint,
            config=self.config,
            shards=[s.model_dump() for s in self.closed],
            open_shard={"name": self.open_path.name, "records": self.open_count},
            records=self.count,
            updated_at=now,
        )
        self.meta.setdefault("created_at", now)
        atomic_write(self.out / MANIFEST, orjson.dumps(self.meta, option=orjson.OPT_INDENT_2))

    def close(self, **extra: Any) -> None:
        """Flush, close the open shard and write the final manifest."""
        self.flush()
        self.rotate()
        self.write_manifest(**extra)

    # -- reading -----------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        """Every durable record (closed shards, then the open one), in write order."""
        paths = [self.shards_dir / s.name for s in self.closed]
        if self.open_path.exists():
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


def read_records(path: Path, *, strict: bool = True) -> Iterator[Record]:
    """Records from a JSONL file, or from an output folder's closed shards."""
    path = Path(path)
    files = sorted((path / SHARDS).glob("part-*.jsonl")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        files = sorted(path.glob("*.jsonl"))
    for file in files:
        with open(file, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield Record.model_validate_json(line)
                except ValidationError as exc:
                    if strict:
                        raise StoreError(f"{file}:{n}: invalid record: {exc.errors()[0]['msg']}") from exc
