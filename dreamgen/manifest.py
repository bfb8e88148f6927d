"""The manifest of an output folder: reading it, and whether a run may resume under it.

``OUT/manifest.json`` records what built OUT (schema version, config, fingerprint) and
what it holds (shards with checksums, totals). The store writes it (``Store.write_manifest``);
this module reads it back checked, and refuses a resume that would mix datasets: another
schema version, or another config or prompt text, unless forced (then the old config is
kept in ``config_history``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from dreamgen.diskio import StoreError
from dreamgen.errors import first_error
from dreamgen.record import SCHEMA_VERSION
from dreamgen.shards import ManifestShape, ShardInfo, parse_listed

log = logging.getLogger("dreamgen.store")

MANIFEST = "manifest.json"


def read_manifest(manifest: Path) -> tuple[dict[str, Any], dict[str, ShardInfo]]:
    """The manifest (checked fields normalised) and the shards it lists, by name; one-line
    ``StoreError`` if it is unreadable or of the wrong shape."""
    try:
        meta = orjson.loads(manifest.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"{manifest} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"cannot read {manifest}: {exc.strerror or exc}") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"{manifest} is not a dreamgen manifest (not a JSON object)")
    listed = parse_listed(meta, manifest)
    try:
        checked = ManifestShape.model_validate(meta)
    except ValidationError as exc:
        raise StoreError(f"{manifest}: {first_error(exc, 'manifest')}") from None
    meta.update(checked.model_dump(exclude_unset=True, exclude_none=True))
    return meta, listed


def check_compatible(
    meta: dict[str, Any], out: Path, config: dict[str, Any], fingerprint: str, force: bool
) -> None:
    """Refuse to resume ``out`` under another schema version or another config/prompt
    fingerprint (naming what changed); with ``force``, note the old config in ``meta``."""
    old_schema = meta.get("schema_version")
    if old_schema is not None and old_schema != SCHEMA_VERSION and not force:
        raise StoreError(
            f"{out} holds records of schema version {old_schema}; this dreamgen "
            f"writes version {SCHEMA_VERSION}; use another --out"
        )
    old = meta.get("fingerprint")
    if not (old and fingerprint and old != fingerprint):
        return
    changed = config_diff(meta.get("config", {}), config) or (
        "the seed cards or prompt templates changed"
    )
    if not force:
        raise StoreError(
            f"{out} was built with a different config ({changed}); "
            "use another --out, or --force to continue with the new config"
        )
    history = meta.setdefault("config_history", [])
    history.append({"fingerprint": old, "config": meta.get("config"), "replaced_at": time.time()})
    log.warning("%s: continuing with a changed config (%s)", out, changed)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """What changed between two configs, as ``key: old -> new`` items (nested keys dotted)."""
    changes: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = config_diff(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(changes)
