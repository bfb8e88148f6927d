"""Shards on disk: their names, what the manifest says of them, and verifying one.

A closed shard is immutable: if its bytes differ from what the manifest recorded at
closing, someone (or something) changed it, and the store refuses to go on rather than
accept the new bytes as the truth. ``--repair`` moves such a shard to ``OUT/quarantine/``
(kept as evidence, noted in the manifest) and the store carries on without it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from dreamgen.diskio import StoreError, atomic_write, fsync_dir
from dreamgen.errors import first_error
from dreamgen.idset import IdSet
from dreamgen.record import Record

SHARDS = "shards"
QUARANTINE = "quarantine"
OPEN_SUFFIX = ".open"
_CLOSED = re.compile(r"part-(\d{6,})\.jsonl")
_OPEN = re.compile(r"part-(\d{6,})\.jsonl\.open")


class ShardInfo(BaseModel):
    """A closed shard as the manifest lists it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    records: int
    sha256: str
    bytes: int
    closed_at: float | None = None


class ShardProblem(StoreError):
    """A closed shard does not verify; ``--repair`` quarantines it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Totals(BaseModel):
    """The manifest's ``totals`` as earlier runs wrote them (checked: a resume adds to them)."""

    model_config = ConfigDict(extra="allow")

    records: int = 0
    rejected: dict[str, int] = {}
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted_tokens: int = 0


class ManifestShape(BaseModel):
    """The manifest fields the store reads back; anything else is carried as it is."""

    model_config = ConfigDict(extra="allow")

    schema_version: int | None = None
    fingerprint: str | None = None
    config: dict[str, Any] = {}
    recovery: dict[str, int] = {}
    totals: _Totals | None = None
    quarantine: list[dict[str, Any]] = []


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


def shard_name(index: int) -> str:
    """42 → ``part-000042.jsonl``."""
    return f"part-{index:06d}.jsonl"


def shard_index(name: str) -> int:
    """``part-000042.jsonl[.open]`` → 42 (ValueError for any other name)."""
    m = _CLOSED.fullmatch(name) or _OPEN.fullmatch(name)
    if m is None:
        raise ValueError(f"not a shard name: {name!r}")
    return int(m.group(1))


def is_closed_shard(path: Path) -> bool:
    return _CLOSED.fullmatch(path.name) is not None and path.is_file()


def is_open_shard(path: Path) -> bool:
    return _OPEN.fullmatch(path.name) is not None and path.is_file()


def closed_shards(out: Path) -> list[Path]:
    """The closed shards of an output folder, in write order (other files are not shards)."""
    paths = [p for p in Path(out, SHARDS).glob("part-*.jsonl") if is_closed_shard(p)]
    return sorted(paths, key=lambda p: shard_index(p.name))


def stray_files(out: Path) -> list[Path]:
    """Files in ``OUT/shards`` that are not shards (a reader globbing ``*.jsonl`` sees them)."""
    folder = Path(out, SHARDS)
    if not folder.is_dir():
        return []
    # By name only: a writer renames ``.open`` shards while we look.
    names = (_CLOSED, _OPEN)
    return sorted(
        p
        for p in folder.iterdir()
        if not (any(n.fullmatch(p.name) for n in names) or p.name.startswith("."))
    )


def read_closed(path: Path, listed: ShardInfo | None, known: IdSet) -> tuple[ShardInfo, list[str]]:
    """Verify one closed shard; its ShardInfo and its ids, or ShardProblem.

    A shard the manifest lists must match its checksum (and so its size and count)
    exactly: it was validated when written, so a match is all there is to check. One it
    does not list (a crash between closing it and writing the manifest) is validated
    record by record. Either way no id may already be in ``known`` (another shard).
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if listed is not None and (listed.sha256 != digest or listed.bytes != len(data)):
        raise ShardProblem(
            path,
            f"differs from the manifest ({len(data)} bytes, sha256 {digest[:12]}…; "
            f"the manifest recorded {listed.bytes} bytes, {listed.sha256[:12]}…): "
            "a closed shard changed after it was written",
        )
    if data and not data.endswith(b"\n"):
        raise ShardProblem(path, "closed shard does not end with a newline")
    ids: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(data.splitlines(), 1):
        try:
            if listed is None:
                rid = Record.model_validate_json(line).id
            else:
                rid = orjson.loads(line)["id"]
        except ValidationError as exc:
            raise ShardProblem(
                path, f"line {n}: invalid record: {first_error(exc, 'record')}"
            ) from None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise ShardProblem(path, f"line {n}: corrupt line in a closed shard") from None
        if not isinstance(rid, str):
            raise ShardProblem(path, f"line {n}: record id is not a string")
        if rid in known or rid in seen:
            raise ShardProblem(path, f"line {n}: duplicate id {rid} (already in another shard)")
        seen.add(rid)
        ids.append(rid)
    if listed is not None and listed.records != len(ids):
        raise ShardProblem(path, f"has {len(ids)} records, the manifest says {listed.records}")
    closed_at = listed.closed_at if listed is not None else None
    info = ShardInfo(
        name=path.name, records=len(ids), sha256=digest, bytes=len(data), closed_at=closed_at
    )
    return info, ids


def trim_open(path: Path, good: list[bytes], dropped: int, known: IdSet) -> tuple[bytes, int]:
    """Cut a recovered open shard down to its good lines; adds their ids to ``known``.

    Returns the shard's bytes and record count; a shard left empty is removed.
    """
    kept: list[bytes] = []
    for line in good:
        rid = orjson.loads(line)["id"]
        if rid not in known:  # never expected: the store refuses known ids
            known.add(rid)
            kept.append(line)
    if not kept:
        path.unlink()
        fsync_dir(path.parent)
        return b"", 0
    data = b"".join(line + b"\n" for line in kept)
    if len(kept) == len(good):  # the usual case: cut the torn tail off in place
        if dropped:
            with open(path, "r+b") as f:
                f.truncate(len(data))
                f.flush()
                os.fsync(f.fileno())
    else:
        atomic_write(path, data)
    return data, len(kept)


def quarantine(out: Path, path: Path, reason: str) -> dict[str, Any]:
    """Move ``path`` to ``OUT/quarantine/`` (never overwriting); the manifest note for it."""
    folder = out / QUARANTINE
    folder.mkdir(exist_ok=True)
    dest = folder / path.name
    n = 1
    while dest.exists():
        dest = folder / f"{path.name}.{n}"
        n += 1
    os.replace(path, dest)
    fsync_dir(folder)
    fsync_dir(path.parent)
    return {
        "shard": path.name,
        "moved_to": str(dest.relative_to(out)),
        "reason": reason,
        "at": time.time(),
    }


def parse_listed(meta: dict[str, Any], manifest: Path) -> dict[str, ShardInfo]:
    """The manifest's shard list by name; StoreError (one line) if it is the wrong shape."""
    shards = meta.get("shards", [])
    if not isinstance(shards, list):
        raise StoreError(f"{manifest}: 'shards' is not a list (not a dreamgen manifest?)")
    listed: dict[str, ShardInfo] = {}
    for i, entry in enumerate(shards):
        try:
            info = ShardInfo.model_validate(entry)
        except ValidationError as exc:
            raise StoreError(f"{manifest}: shards.{i}: {first_error(exc, 'shard')}") from None
        listed[info.name] = info
    return listed
