"""The durable output folder of ``dreamgen label``: exactly once over the input, SIGKILL-safe.

Layout::

    OUT/labelled.jsonl   one ``Labelled`` line per decision point (append-only)
    OUT/rejected.jsonl   one line per input item or decision point that was not labelled
    OUT/state.json       the checkpoint, replaced atomically (tmp, fsync, rename, fsync dir)
    OUT/.lock            held (flock) by the one process writing OUT

Every input item has a position (``dreamgen.conversations``). Finished items' lines are
buffered and, at each ``flush``, appended and fsynced; only then is the checkpoint
written: the positions done (all below ``done_below``, plus the few finished ahead of it
while earlier ones were in flight), both files' sizes, and the totals. Reopening truncates
both files back to the checkpoint's sizes: lines past it were never reported (a torn
line, or a batch killed before its checkpoint) and their items are simply done again. So
an item is written once, whole (all its decision points together), or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections import Counter
from pathlib import Path
from typing import IO, Any

import orjson

from dreamgen.store import StoreError, atomic_write, fsync_dir

LABELLED = "labelled.jsonl"
REJECTED = "rejected.jsonl"
STATE = "state.json"
LOCK = ".lock"
FORMAT = 1


class LabelOutput:
    """Append-only labelled/rejected JSONL with an atomic checkpoint; one writer (flock)."""

    def __init__(self, out: Path, run: dict[str, Any]) -> None:
        self.out = Path(out)
        self.run = run
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock: IO[bytes] | None = open(self.out / LOCK, "ab")  # noqa: SIM115
        except OSError as exc:
            raise StoreError(f"cannot write to {self.out}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreError(f"{self.out} is being written by another process") from None
        self.done_below = 0
        self.ahead: set[int] = set()
        self.totals: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._lines: list[bytes] = []
        self._rejects: list[bytes] = []
        self._finished: list[int] = []
        self._recover()
        self._files = {
            name: open(self.out / name, "ab")  # noqa: SIM115 - closed in close()
            for name in (LABELLED, REJECTED)
        }

    def _recover(self) -> None:
        state_path = self.out / STATE
        sizes = {LABELLED: 0, REJECTED: 0}
        if state_path.exists():
            try:
                state = orjson.loads(state_path.read_bytes())
            except orjson.JSONDecodeError:
                raise StoreError(f"{state_path} is corrupt (not JSON)") from None
            old = state.get("run", {})
            changed = [k for k in sorted(set(old) | set(self.run)) if old.get(k) != self.run.get(k)]
            if changed:
                what = ", ".join(f"{k}: {old.get(k)!r} → {self.run.get(k)!r}" for k in changed)
                raise StoreError(
                    f"{self.out} was labelled by another run ({what}); use a new --out"
                )
            self.done_below = int(state["done_below"])
            self.ahead = set(state.get("ahead", []))
            self.totals.update(state.get("totals", {}))
            self.rejected.update(state.get("rejected", {}))
            sizes = {name: int(state["bytes"][name]) for name in sizes}
        elif any((self.out / name).exists() and (self.out / name).stat().st_size for name in sizes):
            # Never truncate a file this folder's checkpoint does not vouch for.
            raise StoreError(f"{self.out} holds labelled output but no {STATE}: use a new --out")
        for name, size in sizes.items():
            path = self.out / name
            have = path.stat().st_size if path.exists() else 0
            if have < size:
                raise StoreError(f"{path} is shorter than its checkpoint ({have} < {size} bytes)")
            if have > size:  # written after the last checkpoint: never reported
                with open(path, "r+b") as f:
                    f.truncate(size)
                    f.flush()
                    os.fsync(f.fileno())
        if not state_path.exists():
            self._checkpoint(sizes)

    def is_done(self, index: int) -> bool:
        """Whether input item ``index`` was finished by an earlier run (or this one)."""
        return index < self.done_below or index in self.ahead

    def finish(
        self,
        index: int,
        lines: list[bytes],
        rejects: list[dict[str, Any]],
        counts: Counter[str] | None = None,
    ) -> None:
        """Buffer one input item's output (written at the next ``flush``, all or nothing)."""
        self._lines.extend(lines)
        for reject in rejects:
            self.rejected[str(reject["reason"])] += 1
            self._rejects.append(orjson.dumps(reject))
        if counts:
            self.totals.update(counts)
        self._finished.append(index)

    @property
    def buffered(self) -> int:
        """Items finished but not yet durable."""
        return len(self._finished)

    def flush(self) -> int:
        """Append and fsync what is buffered, then checkpoint; returns the items made durable."""
        if not self._finished:
            return 0
        for name, lines in ((LABELLED, self._lines), (REJECTED, self._rejects)):
            if lines:
                f = self._files[name]
                f.write(b"\n".join(lines) + b"\n")
                f.flush()
                os.fsync(f.fileno())
        for index in self._finished:
            self.ahead.add(index)
        while self.done_below in self.ahead:
            self.ahead.discard(self.done_below)
            self.done_below += 1
        n = len(self._finished)
        self._lines, self._rejects, self._finished = [], [], []
        self._checkpoint({name: f.tell() for name, f in self._files.items()})
        return n

    def _checkpoint(self, sizes: dict[str, int]) -> None:
        state = {
            "format": FORMAT,
            "run": self.run,
            "done_below": self.done_below,
            "ahead": sorted(self.ahead),
            "bytes": sizes,
            "totals": dict(sorted(self.totals.items())),
            "rejected": dict(sorted(self.rejected.items())),
        }
        atomic_write(self.out / STATE, orjson.dumps(state, option=orjson.OPT_INDENT_2))

    def close(self) -> None:
        """Flush what is buffered and release the folder; safe to call twice."""
        if self._lock is None:
            return
        try:
            self.flush()
        finally:
            for f in self._files.values():
                f.close()
            with contextlib.suppress(OSError):
                fsync_dir(self.out)
            self._lock.close()
            self._lock = None
