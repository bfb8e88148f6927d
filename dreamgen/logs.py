"""Structured logs: one line per notable event, as text or JSON lines.

``event(log, level, name, msg, **fields)`` logs ``msg`` with an event name and fields;
``setup_logging`` routes the ``dreamgen`` loggers to stderr or a file, formatted as text
or as one JSON object per line (for log shippers: Kubernetes, journald, Loki).
"""

from __future__ import annotations

import logging
import sys
import time
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


class RateLimit(logging.Filter):
    """At most ``burst`` warnings per message template and logger every ``window_s``.

    Records below WARNING (the daemon's events: ready, shard closed, status) all pass.
    A failure that repeats per request (a full disk, a dead server) logs a few lines, then
    one line per window saying how many like it were dropped — never megabytes a minute.
    """

    def __init__(self, burst: int = 5, window_s: float = 60.0, max_keys: int = 4096) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str], list[float]] = {}  # key: [window start, n, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self.window_s:
            dropped = int(state[2]) if state is not None else 0
            if len(self._seen) >= self.max_keys:
                self._seen.clear()  # bounded memory, whatever the messages
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} like it suppressed)"
            return True
        state[1] += 1
        if state[1] <= self.burst:
            return True
        state[2] += 1
        return False


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
    handler.addFilter(RateLimit())
    # aiohttp's server logs an error per bad connection: a flood must not fill the disk.
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RateLimit) for f in server_log.filters):
        server_log.addFilter(RateLimit())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
