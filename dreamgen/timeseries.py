"""A small time series of a build's progress: ``OUT/timeseries.jsonl``, append-only.

The pipeline appends one point every ``interval_s`` (and one when a run ends): this run's
cumulative counters and the time. ``dreamgen report`` turns consecutive points into yield
and tokens/s over the build's lifetime, across resumed runs (each run has its own
``run_started``). A torn last line (a crash mid-append) is skipped by the reader; the file
is a chart's input, not data anything else depends on, so it is not fsynced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

TIMESERIES = "timeseries.jsonl"
FIELDS = ("requests", "accepted", "minimal_pairs", "completion_tokens", "accepted_tokens")


class TimeSeries:
    """The appender; one per run."""

    def __init__(self, out: Path, *, interval_s: float = 10.0) -> None:
        self.path = Path(out) / TIMESERIES
        self.interval_s = interval_s
        self.run_started = time.time()
        self._last = float("-inf")  # the first call writes: a run's starting point

    def maybe_append(self, counters: dict[str, Any], *, force: bool = False) -> bool:
        """Append a point if ``interval_s`` has passed (or ``force``); True if written."""
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return False
        self._last = now
        point: dict[str, Any] = {"t": round(time.time(), 3), "run_started": self.run_started}
        point.update({k: int(counters.get(k) or 0) for k in FIELDS})
        with open(self.path, "ab") as f:
            f.write(orjson.dumps(point) + b"\n")
        return True


def read_timeseries(out: Path) -> list[dict[str, Any]]:
    """The points of ``out`` in file order; unreadable lines are skipped."""
    path = Path(out) / TIMESERIES
    points: list[dict[str, Any]] = []
    if not path.is_file():
        return points
    for line in path.read_bytes().splitlines():
        try:
            point = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(point, dict) and isinstance(point.get("t"), int | float):
            points.append(point)
    return points
