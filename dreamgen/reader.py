"""Read a dataset: stream validated records from closed shards, optionally following a writer.

``read(path)`` takes an output folder (``OUT``: its closed ``shards/part-*.jsonl`` in
order; the open shard is never read), a folder of ``*.jsonl`` files, or one JSONL file.

Following (``follow=True``, output folders only) is for a trainer reading what a build or
a daemon is still writing: after the shards present, it waits for new ones to close and
reads each once, in order. It ends

- when ``stop`` says so: a callable returning True, or a ``threading.Event`` that is set
  (checked every ``poll_s``; an Event wakes it at once); or
- when the manifest says ``state: "complete"`` (a build closed OUT with its target
  reached) and every shard has been read.

A writer that was stopped or killed leaves the state ``stopped`` or ``running``; a
follower then waits (a writer may resume), so bound it with ``stop`` if that matters,
e.g. ``stop=lambda: time.monotonic() > deadline``. Without ``follow`` the iterator ends
after the shards present when it reaches them.

The closed shards are plain JSONL, so ``datasets.load_dataset("json",
data_files="OUT/shards/*.jsonl")`` reads them too (without validation or filters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Protocol

import orjson
from pydantic import ValidationError

from dreamgen.errors import first_error
from dreamgen.record import Record
from dreamgen.shards import closed_shards
from dreamgen.store import MANIFEST, SHARDS, StoreError


class _EventLike(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


Stop = Callable[[], bool] | _EventLike


def manifest_state(out: Path) -> str | None:
    """The manifest's ``state`` (``running``, ``complete``, ``stopped``), None if unreadable."""
    try:
        state = orjson.loads((Path(out) / MANIFEST).read_bytes()).get("state")
    except (OSError, orjson.JSONDecodeError, AttributeError):  # a non-object is no manifest
        return None
    return state if isinstance(state, str) else None


def read(
    path: str | Path,
    split: str | Collection[str] | None = None,
    *,
    min_difficulty: int | None = None,
    kinds: str | Collection[str] | None = None,
    follow: bool = False,
    poll_s: float = 1.0,
    stop: Stop | None = None,
) -> Iterator[Record]:
    """Validated records from ``path``, filtered (see the module docstring for ``follow``).

    ``split``: ``"train"``, ``"eval"``, ``"probe"`` or several; ``min_difficulty``: keep
    records at least this subtle (1–5); ``kinds``: keep records whose cue kind
    (``axes.cue_kind``) is one of these. A line that is not a valid record raises
    StoreError naming the file and line.
    """
    path = Path(path)
    splits = {split} if isinstance(split, str) else set(split) if split is not None else None
    cue_kinds = {kinds} if isinstance(kinds, str) else set(kinds) if kinds is not None else None

    def keep(r: Record) -> bool:
        return (
            (splits is None or r.split in splits)
            and (min_difficulty is None or r.difficulty >= min_difficulty)
            and (cue_kinds is None or r.axes.cue_kind in cue_kinds)
        )

    if not follow:
        for file in _files(path):
            yield from (r for r in _records(file) if keep(r))
        return
    if path.is_file():
        raise ValueError("follow=True needs an output folder, not a file")
    done: set[str] = set()
    while True:
        complete = manifest_state(path) == "complete"  # read before listing: see docstring
        new = [p for p in closed_shards(path) if p.name not in done]
        for file in new:
            yield from (r for r in _records(file) if keep(r))
            done.add(file.name)
        if new:
            continue  # more may have closed meanwhile; look again before sleeping
        if complete or _stopped(stop, poll_s):
            return


def _stopped(stop: Stop | None, poll_s: float) -> bool:
    """Wait up to ``poll_s``; True if ``stop`` asks to end."""
    if stop is None:
        time.sleep(poll_s)
        return False
    if callable(stop):
        if stop():
            return True
        time.sleep(poll_s)
        return bool(stop())
    return stop.wait(poll_s)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise StoreError(f"{path}: no such file or folder")
    if (path / SHARDS).is_dir():
        return closed_shards(path)
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise StoreError(f"{path}: no shards/ and no *.jsonl files")
    return files


def _records(file: Path) -> Iterator[Record]:
    with open(file, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.model_validate_json(line)
            except ValidationError as exc:
                raise StoreError(
                    f"{file}:{n}: invalid record: {first_error(exc, 'record')}"
                ) from None
