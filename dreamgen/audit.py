"""`dreamgen validate`: check a JSONL file or a whole output folder, line by line."""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import ValidationError

from dreamgen.record import Record
from dreamgen.store import MANIFEST, OPEN_SUFFIX, SHARDS, file_sha256


def audit(path: Path) -> tuple[int, list[str]]:
    """Count the valid records under ``path`` and list every problem, one line each.

    Checks each line against the Record schema (which checks every span's offsets), ids
    for duplicates, and for an output folder the manifest's counts and checksums.
    """
    path = Path(path)
    problems: list[str] = []
    if path.is_dir():
        files = sorted((path / SHARDS).glob("part-*.jsonl")) or sorted(path.glob("*.jsonl"))
    elif path.exists():
        files = [path]
    else:
        return 0, [f"{path}: no such file or folder"]
    seen: dict[str, str] = {}
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
                if record.id in seen:
                    problems.append(f"{where}: duplicate id {record.id} (first at {seen[record.id]})")
                seen[record.id] = where
                valid += 1
        counts[file.name] = n_lines
    if path.is_dir() and (path / MANIFEST).exists():
        problems += _check_manifest(path, counts)
    return valid, problems


def _check_manifest(out: Path, counts: dict[str, int]) -> list[str]:
    problems = []
    try:
        manifest = orjson.loads((out / MANIFEST).read_bytes())
    except orjson.JSONDecodeError as exc:
        return [f"{MANIFEST}: invalid JSON: {exc}"]
    listed = {s["name"]: s for s in manifest.get("shards", [])}
    for name, info in listed.items():
        shard = out / SHARDS / name
        if not shard.exists():
            problems.append(f"{MANIFEST}: lists {name}, which does not exist")
            continue
        if counts.get(name) != info["records"]:
            problems.append(
                f"{MANIFEST}: {name} has {counts.get(name)} records, manifest says {info['records']}"
            )
        if file_sha256(shard) != info["sha256"]:
            problems.append(f"{MANIFEST}: {name} checksum differs from the manifest")
    for name in counts:
        if name not in listed and not name.endswith(OPEN_SUFFIX):
            problems.append(f"{MANIFEST}: closed shard {name} is not listed")
    total = sum(counts.values())
    if manifest.get("records") is not None and manifest["records"] != total:
        problems.append(f"{MANIFEST}: records = {manifest['records']}, shards hold {total}")
    return problems
