"""`dreamgen validate`: check a JSONL file or a whole output folder, line by line.

Per record: the Record schema (which checks every span's offsets), the id against the
content hash, duplicate ids, duplicate content (normalised text), and split leaks (one
``group_id`` in two splits, or a split other than its group's assignment). For an output
folder also the manifest: every closed shard listed with its record count and sha256,
nothing listed that is missing, and the totals. The open shard (``*.jsonl.open``, a run
in progress or interrupted) is not part of the dataset and is not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from dreamgen.dedup import conversation_text, exact_key
from dreamgen.reader import closed_shards
from dreamgen.record import SCHEMA_VERSION, Record, Split, content_id, split_for
from dreamgen.store import MANIFEST, SHARDS, file_sha256


def audit(path: Path) -> tuple[int, list[str]]:
    """Count the valid records under ``path`` and list every problem, one line each."""
    path = Path(path)
    problems: list[str] = []
    manifest: dict[str, Any] | None = None
    if path.is_dir():
        files = closed_shards(path) if (path / SHARDS).is_dir() else sorted(path.glob("*.jsonl"))
        if (path / MANIFEST).exists():
            try:
                manifest = orjson.loads((path / MANIFEST).read_bytes())
            except orjson.JSONDecodeError as exc:
                problems.append(f"{MANIFEST}: invalid JSON: {exc}")
    elif path.exists():
        files = [path]
    else:
        return 0, [f"{path}: no such file or folder"]
    ratios = (manifest or {}).get("config", {}).get("splits") or None
    seen: dict[str, str] = {}
    contents: dict[bytes, str] = {}
    groups: dict[str, tuple[str, str]] = {}
    counts: dict[str, int] = {}
    valid = 0
    for file in files:
        n_lines = 0
        with open(file, "rb") as f:
            for n, line in enumerate(f, 1):
                where = f"{file.name}:{n}"
                n_lines += 1
                if not line.endswith(b"\n"):
                    problems.append(f"{where}: torn line (no newline)")
                try:
                    record = Record.model_validate(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    problems.append(f"{where}: invalid JSON: {exc}")
                    continue
                except ValidationError as exc:
                    err = exc.errors()[0]
                    loc = ".".join(str(p) for p in err["loc"]) or "record"
                    problems.append(f"{where}: {loc}: {err['msg'].removeprefix('Value error, ')}")
                    continue
                valid += 1
                problems += _check_record(record, where, seen, contents, groups, ratios)
        counts[file.name] = n_lines
    if manifest is not None:
        problems += _check_manifest(path, manifest, counts)
    return valid, problems


def _check_record(
    record: Record,
    where: str,
    seen: dict[str, str],
    contents: dict[bytes, str],
    groups: dict[str, tuple[str, str]],
    ratios: dict[Split, float] | None,
) -> list[str]:
    problems = []
    if record.id in seen:
        problems.append(f"{where}: duplicate id {record.id} (first at {seen[record.id]})")
    else:
        seen[record.id] = where
        key = exact_key(conversation_text(record))
        if key in contents:
            problems.append(f"{where}: duplicate content (first at {contents[key]})")
        contents.setdefault(key, where)
    if record.id != content_id(record.messages, record.target, record.contrast):
        problems.append(f"{where}: id {record.id} is not the content hash")
    first = groups.setdefault(record.group_id, (record.split, where))
    if first[0] != record.split:
        problems.append(
            f"{where}: group {record.group_id} in split {record.split!r}, "
            f"but in {first[0]!r} at {first[1]} (splits leak)"
        )
    elif ratios and first[1] == where and record.split != split_for(record.group_id, ratios):
        problems.append(
            f"{where}: split {record.split!r} is not its group's assignment "
            f"{split_for(record.group_id, ratios)!r}"
        )
    return problems


def _check_manifest(out: Path, manifest: dict[str, Any], counts: dict[str, int]) -> list[str]:
    problems = []
    if manifest.get("schema_version") not in (None, SCHEMA_VERSION):
        problems.append(
            f"{MANIFEST}: schema_version {manifest['schema_version']}, expected {SCHEMA_VERSION}"
        )
    listed = {s["name"]: s for s in manifest.get("shards", [])}
    for name, info in listed.items():
        shard = out / SHARDS / name
        if not shard.exists():
            problems.append(f"{MANIFEST}: lists {name}, which does not exist")
            continue
        if counts.get(name) != info["records"]:
            problems.append(
                f"{MANIFEST}: {name} has {counts.get(name)} records, "
                f"manifest says {info['records']}"
            )
        if shard.stat().st_size != info.get("bytes", shard.stat().st_size):
            problems.append(f"{MANIFEST}: {name} size differs from the manifest")
        elif file_sha256(shard) != info["sha256"]:
            problems.append(f"{MANIFEST}: {name} checksum differs from the manifest")
    for name in counts:
        if name not in listed:
            problems.append(
                f"{MANIFEST}: closed shard {name} is not listed (an interrupted run? "
                "resume it to bring the manifest up to date)"
            )
    open_shard = manifest.get("open_shard") or {}
    expected = sum(s["records"] for s in listed.values()) + open_shard.get("records", 0)
    if manifest.get("records") is not None and manifest["records"] != expected:
        problems.append(
            f"{MANIFEST}: records = {manifest['records']}, but its shards add up to {expected}"
        )
    return problems
