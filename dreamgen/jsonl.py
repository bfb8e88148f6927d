"""Reading JSON Lines files that people hand us (held-out sets, labelled conversations).

``jsonlines`` with orjson as its codec, plus the line number of each object, so that a bad
line is reported as ``FILE:LINE: …`` and the caller can name the field too. The store's
shards are not read here: their reader validates each line straight from bytes
(``Record.model_validate_json``), which skips building a dict, and their writer controls
every byte for durability (``dreamgen.store``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import jsonlines
import orjson


class JsonlError(ValueError):
    """A line that is not JSON; the message names the file and the line."""


class _Numbered:
    """The lines of a file, remembering the number of the last one handed out."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.lineno = 0

    def __iter__(self) -> Iterator[bytes]:
        for n, line in enumerate(self.f, 1):
            self.lineno = n
            yield line


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Stream ``(line number, decoded value)`` from a JSONL file; blank lines are skipped.

    Raises ``JsonlError`` at the first line that is not JSON.
    """
    with open(path, "rb") as f:
        lines = _Numbered(f)
        reader = jsonlines.Reader(lines, loads=orjson.loads)
        try:
            for value in reader.iter(skip_empty=True):
                yield lines.lineno, value
        except jsonlines.InvalidLineError as exc:
            raise JsonlError(f"{path}:{exc.lineno}: invalid JSON: {exc.__cause__ or exc}") from None
