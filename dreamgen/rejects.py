"""A bounded, rotating sample of rejected raw answers, per reason, in ``OUT/rejected/``.

Layout::

    OUT/rejected/<reason>.jsonl    the newest kept answers for one reason, oldest first

Each line is a ``RejectedAnswer``: the raw model answer (clipped), the reason and its
message, and the request that produced it. Per reason the sample keeps at most
``per_reason`` answers and ``max_bytes`` bytes, dropping the oldest first, so a run of
any length leaves a folder of bounded size. Files are replaced atomically (tmp, fsync,
rename, like the manifest), at most every ``write_interval_s`` and on close, so a crash
leaves the previous sample whole. Nothing here is training data: readers, the trainer
and ``dreamgen validate`` look only at ``OUT/shards/``.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from dreamgen.request import Request
from dreamgen.store import atomic_write

REJECTED = "rejected"
_REASON = re.compile(r"^[a-z0-9_]{1,64}$")  # reasons are StrEnum values: safe file names


class RejectedAnswer(BaseModel):
    """One kept rejection: what the model said and what it was asked."""

    model_config = ConfigDict(extra="ignore")

    reason: str
    message: str = ""
    at: float
    raw: str  # the raw answer, clipped to ``max_answer_chars``
    raw_chars: int  # its length before clipping
    finish_reason: str = ""
    card: str = ""
    mode: str = ""
    schema_name: str = ""
    axes: dict[str, Any] | None = None
    difficulty: int | None = None
    prompt_hash: str = ""
    request_messages: list[dict[str, str]] = []  # each content clipped like ``raw``


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


class RejectSample:
    """The writer of ``OUT/rejected/``; one per run, alongside the store."""

    def __init__(
        self,
        out: Path,
        *,
        per_reason: int = 20,
        max_bytes: int = 256 * 1024,
        max_answer_chars: int = 16_000,
        write_interval_s: float = 5.0,
    ) -> None:
        self.dir = Path(out) / REJECTED
        self.per_reason = max(1, per_reason)
        self.max_bytes = max(1024, max_bytes)
        self.max_answer_chars = max_answer_chars
        self.write_interval_s = write_interval_s
        self.kept: dict[str, deque[bytes]] = {}
        self.dirty: set[str] = set()
        self._last_write = 0.0
        # A resumed run goes on from the sample on disk, so restarts do not wipe it.
        for reason, lines in _load(self.dir).items():
            self.kept[reason] = deque(lines)

    def add(
        self,
        reason: str,
        request: Request,
        raw: str,
        *,
        message: str = "",
        finish_reason: str = "",
    ) -> None:
        """Keep this rejection (the oldest of its reason may be dropped at the next write)."""
        if not _REASON.match(reason):
            return  # not a name we can use as a file; reasons are enum values, so never
        clip = self.max_answer_chars
        entry = RejectedAnswer(
            reason=reason,
            message=_clip(message, 2000),
            at=time.time(),
            raw=_clip(raw, clip),
            raw_chars=len(raw),
            finish_reason=finish_reason,
            card=request.card,
            mode=request.mode,
            schema_name=request.schema_name,
            axes=request.axes.model_dump(mode="json") if request.axes is not None else None,
            difficulty=request.difficulty,
            prompt_hash=request.prompt_hash,
            request_messages=[
                {"role": m.get("role", ""), "content": _clip(m.get("content", ""), clip)}
                for m in request.messages
            ],
        )
        lines = self.kept.setdefault(reason, deque())
        lines.append(orjson.dumps(entry.model_dump(mode="json")) + b"\n")
        while len(lines) > self.per_reason:
            lines.popleft()
        self.dirty.add(reason)

    def flush(self, *, force: bool = False) -> None:
        """Write the changed reasons' files (atomically), at most every write_interval_s."""
        if not self.dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_write < self.write_interval_s:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for reason in sorted(self.dirty):
            lines = self.kept[reason]
            size = sum(len(line) for line in lines)
            while len(lines) > 1 and size > self.max_bytes:
                size -= len(lines.popleft())
            atomic_write(self.dir / f"{reason}.jsonl", b"".join(lines))
        self.dirty.clear()
        self._last_write = now

    def counts(self) -> dict[str, int]:
        """Kept answers per reason (what the manifest reports)."""
        return {reason: len(lines) for reason, lines in sorted(self.kept.items()) if lines}


def _load(folder: Path) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.jsonl")):
        if _REASON.match(path.stem):
            found[path.stem] = [ln + b"\n" for ln in path.read_bytes().splitlines() if ln.strip()]
    return found


def read_rejected(out: Path, reason: str | None = None) -> Iterator[RejectedAnswer]:
    """The kept rejections of an output folder (one reason, or all), oldest first per reason.

    Lines that do not parse (a hand-edited file) are skipped: this is a sample to look at,
    never data anything depends on.
    """
    folder = Path(out) / REJECTED
    if not folder.is_dir():
        return
    paths = [folder / f"{reason}.jsonl"] if reason is not None else sorted(folder.glob("*.jsonl"))
    for path in paths:
        if not _REASON.match(path.stem) or not path.is_file():
            continue
        for line in path.read_bytes().splitlines():
            try:
                yield RejectedAnswer.model_validate_json(line)
            except ValidationError:
                continue


def rejected_reasons(out: Path) -> list[str]:
    """Reasons with a kept sample in ``out``."""
    folder = Path(out) / REJECTED
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.jsonl") if _REASON.match(p.stem))
