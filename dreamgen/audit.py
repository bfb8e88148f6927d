"""`dreamgen validate`: check a JSONL file or a whole output folder, line by line.

Per record: the Record schema (which checks every span's offsets), the id against the
content hash, duplicate ids, duplicate content (normalised text), and split leaks (one
``group_id`` in two splits, or a split other than its group's assignment). For an output
folder also the manifest: every closed shard listed with its record count and sha256,
nothing listed that is missing, and the totals. The open shard (``*.jsonl.open``, a run
in progress or interrupted) is not part of the dataset and is not checked.

A live writer is tolerated: the manifest is read before the shards are listed (a shard is
renamed into place before the manifest that lists it is written); a shard closed after
that snapshot, while the folder's lock is held, is checked as records but not reported as
unlisted, and one the snapshot missed is looked up in a fresh read before it is reported.
Files in ``shards/`` that are not shards are reported, never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from dreamgen.dedup import conversation_text, exact_key
from dreamgen.diskio import file_sha256, folder_locked
from dreamgen.errors import first_error
from dreamgen.record import SCHEMA_VERSION, Record, Split, content_id, split_for
from dreamgen.shards import SHARDS, closed_shards, shard_index, stray_files
from dreamgen.store import MANIFEST


def audit(path: Path) -> tuple[int, list[str]]:
    """Count the valid records under ``path`` and list every problem, one line each."""
    path = Path(path)
    problems: list[str] = []
    manifest: dict[str, Any] | None = None
    live = False
    if path.is_dir():
        # The manifest first: every shard it lists is on disk by then (see the docstring).
        live = folder_locked(path)
        if (path / MANIFEST).exists():
            manifest, problem = _read_manifest(path / MANIFEST)
            problems += problem
        is_out = (path / SHARDS).is_dir()
        files = closed_shards(path) if is_out else sorted(path.glob("*.jsonl"))
        if is_out:
            problems += [
                f"{SHARDS}/{p.name}: not a shard (readers globbing *.jsonl would read it)"
                for p in stray_files(path)
            ]
    elif path.exists():
        files = [path]
    else:
        return 0, [f"{path}: no such file or folder"]
    config = (manifest or {}).get("config")
    ratios = config.get("splits") if isinstance(config, dict) else None
    if not (isinstance(ratios, dict) and ratios):
        ratios = None
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
                    problems.append(f"{where}: {first_error(exc, 'record')}")
                    continue
                valid += 1
                problems += _check_record(record, where, seen, contents, groups, ratios)
        counts[file.name] = n_lines
    if manifest is not None:
        try:
            problems += _check_manifest(path, manifest, counts, live)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems.append(f"{MANIFEST}: not a dreamgen manifest ({type(exc).__name__}: {exc})")
    return valid, problems


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        return None, [f"{MANIFEST}: invalid JSON: {exc}"]
    except OSError as exc:
        return None, [f"{MANIFEST}: cannot read: {exc.strerror or exc}"]
    if not isinstance(data, dict):
        return None, [f"{MANIFEST}: not a JSON object"]
    return data, []


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


def _check_manifest(
    out: Path, manifest: dict[str, Any], counts: dict[str, int], live: bool
) -> list[str]:
    problems = []
    if manifest.get("schema_version") not in (None, SCHEMA_VERSION):
        problems.append(
            f"{MANIFEST}: schema_version {manifest['schema_version']}, expected {SCHEMA_VERSION}"
        )
    listed = {s["name"]: s for s in manifest.get("shards") or []}
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
    open_shard = manifest.get("open_shard") or {}
    # With a writer live, shards from the one open at the snapshot on are newer than it.
    newest = max((shard_index(n) for n in listed), default=-1) + 1
    if open_shard.get("name"):
        newest = max(newest, shard_index(open_shard["name"]))
    unlisted = [n for n in counts if n not in listed and not (live and shard_index(n) >= newest)]
    if unlisted:  # a writer may have listed them since (and ended): ask the manifest again
        fresh, _ = _read_manifest(out / MANIFEST)
        now_listed = {s.get("name") for s in (fresh or {}).get("shards") or []}
        unlisted = [n for n in unlisted if n not in now_listed]
    for name in unlisted:
        problems.append(
            f"{MANIFEST}: closed shard {name} is not listed (an interrupted run? "
            "resume it to bring the manifest up to date)"
        )
    expected = sum(s["records"] for s in listed.values()) + open_shard.get("records", 0)
    if manifest.get("records") is not None and manifest["records"] != expected:
        problems.append(
            f"{MANIFEST}: records = {manifest['records']}, but its shards add up to {expected}"
        )
    return problems
