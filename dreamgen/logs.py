"""Structured logs: one line per notable event, as text or JSON lines.

``event(log, level, name, msg, **fields)`` logs ``msg`` with an event name and fields;
``setup_logging`` routes the ``dreamgen`` loggers to stderr or a file, formatted as text
or as one JSON object per line (for log shippers: Kubernetes, journald, Loki).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson


def event(
    log: logging.Logger, level: int, name: str, msg: str, /, *args: Any, **fields: Any
) -> None:
    """Log ``msg % args`` as event ``name`` with ``fields`` (JSON keys in the JSON format)."""
    log.log(level, msg, *args, extra={"event": name, "fields": fields})


# ---------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, msg, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "msg": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(fmt: str = "text", level: str = "info", path: Path | None = None) -> None:
    """Route the ``dreamgen`` loggers to stderr (or ``path``) as text or JSON lines."""
    root = logging.getLogger("dreamgen")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    handler: logging.Handler
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
