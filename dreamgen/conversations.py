"""Read conversations in the formats people have, streaming, one position per input item.

Formats (``fmt="auto"`` picks by file suffix and by each row's fields):
- JSONL with OpenAI-style ``messages`` (``role``/``content``; ``content`` may be a list of
  ``{"type": "text", "text": ...}`` parts), or ShareGPT ``conversations``
  (``from``/``value``, with ``human``/``gpt`` roles); labelled lines read the same way
  (their labels are ignored);
- a Parquet file, an Arrow file, or a Hugging Face ``datasets`` folder (``save_to_disk``
  output, a ``DatasetDict`` folder, or a folder of Parquet/Arrow/JSONL files), read in
  batches with pyarrow;
- ``column`` names the field that holds the messages when it is not ``messages`` or
  ``conversations`` (a JSON string in that field is decoded too).

Every input item, good or bad, gets the next ``index`` (0-based, over all files in
order): that is what a resumable labelling run counts to do every item exactly once. A bad
item comes out as ``BadInput`` naming its place (``FILE:LINE`` or ``FILE:row N``), so a
caller reports it and carries on with the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

Format = Literal["auto", "openai", "sharegpt"]

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")


class InputError(ValueError):
    """The input cannot be read at all (missing, unknown type, needs pyarrow): one line."""


@dataclass(slots=True)
class Conversation:
    """One conversation read from the input: ``messages`` as ``{"role", "content"}``."""

    index: int
    where: str
    messages: list[dict[str, str]]
    source_id: str | None = None


@dataclass(slots=True)
class BadInput:
    """An input item that is not a conversation; ``detail`` says why (one line)."""

    index: int
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


Item = Conversation | BadInput


class _Bad(ValueError):
    pass


def _text(content: Any, at: str) -> str:
    if content is None:
        return ""  # e.g. an assistant turn that only called a tool
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                    continue
            if isinstance(part, str):
                parts.append(part)
                continue
            raise _Bad(f"{at}: a content part that is not text")
        return "\n".join(parts)
    raise _Bad(f"{at}: content is {type(content).__name__}, not text")


def normalise(row: Any, column: str | None = None, fmt: Format = "auto") -> list[dict[str, str]]:
    """The messages of one row as ``[{"role", "content"}]``; raises ValueError (one line)."""
    if not isinstance(row, dict):
        raise _Bad(f"a row must be a JSON object, not {type(row).__name__}")
    if column is not None:
        if column not in row:
            raise _Bad(f"no {column!r} field (fields: {', '.join(map(str, row))})")
        value = row[column]
    elif fmt in ("auto", "openai") and "messages" in row:
        value = row["messages"]
    elif fmt in ("auto", "sharegpt") and "conversations" in row:
        value = row["conversations"]
    else:
        want = {"auto": "'messages' or 'conversations'", "openai": "'messages'"}.get(
            fmt, "'conversations'"
        )
        raise _Bad(f"no {want} field (name the field with --column)")
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise _Bad("the messages field is a string that is not JSON") from None
    if not isinstance(value, list) or not value:
        raise _Bad("the messages field must be a non-empty list")
    messages: list[dict[str, str]] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _Bad(f"message {i} is not an object")
        role = msg.get("role", msg.get("from"))
        mapped = ROLES.get(str(role).lower()) if role is not None else None
        if mapped is None:
            raise _Bad(f"message {i}: unknown role {role!r}")
        content = msg["content"] if "content" in msg else msg.get("value")
        messages.append({"role": mapped, "content": _text(content, f"message {i}")})
    return messages


def _source_id(row: Any) -> str | None:
    if isinstance(row, dict):
        value = row.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return None


def _item(index: int, where: str, row: Any, column: str | None, fmt: Format) -> Item:
    try:
        return Conversation(index, where, normalise(row, column, fmt), _source_id(row))
    except _Bad as exc:
        return BadInput(index, where, str(exc))


def _jsonl(path: Path, start: int, column: str | None, fmt: Format) -> Iterator[Item]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where, index = f"{path}:{number}", start + number - 1
            if not raw.strip():
                yield BadInput(index, where, "empty line")
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield BadInput(index, where, f"not JSON: {exc}")
                continue
            yield _item(index, where, row, column, fmt)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InputError(
            "reading Parquet/Arrow needs pyarrow (pip install 'dreamgen[parquet]')"
        ) from None
    return pyarrow


def _batches(path: Path) -> Iterator[Any]:
    pa = _pyarrow()
    if path.suffix == ".parquet":
        yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=256)
        return
    # datasets' save_to_disk writes the Arrow stream format; plain .arrow may be a file.
    try:
        reader = pa.ipc.open_stream(path)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(path)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _table_rows(path: Path, start: int, column: str | None, fmt: Format) -> Iterator[Item]:
    index = start
    try:
        for batch in _batches(path):
            for row in batch.to_pylist():
                yield _item(index, f"{path}:row {index - start + 1}", row, column, fmt)
                index += 1
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None


def data_files(path: Path) -> list[Path]:
    """The files a path stands for, in a fixed order (a file is itself)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    splits = path / "dataset_dict.json"
    if splits.exists():  # a DatasetDict: its splits in the order it lists them
        names = orjson.loads(splits.read_bytes()).get("splits", [])
        return [f for name in names for f in data_files(path / name)]
    state = path / "state.json"
    if state.exists():  # one save_to_disk split: its own list of Arrow files
        listed = orjson.loads(state.read_bytes()).get("_data_files", [])
        return [path / entry["filename"] for entry in listed]
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in _DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not found:
        raise InputError(f"{path}: no .parquet, .arrow or .jsonl files in this folder")
    return found


def read_conversations(
    path: str | Path, *, column: str | None = None, fmt: Format = "auto"
) -> Iterator[Item]:
    """Stream every input item of ``path`` (a file or a folder) in order, good or bad."""
    index = 0
    for file in data_files(Path(path)):
        if file.suffix in (".parquet", ".arrow"):
            items = _table_rows(file, index, column, fmt)
        elif file.suffix in (".jsonl", ".json"):
            items = _jsonl(file, index, column, fmt)
        else:
            raise InputError(f"{file}: unknown input type (want .jsonl, .parquet or .arrow)")
        for item in items:
            index = item.index + 1
            yield item
