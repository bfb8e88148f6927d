"""Progress of a build a person can trust: a live bar on a terminal, log lines elsewhere.

``Progress(run, mode)`` samples a ``pipeline.Run`` on a timer (not only when a record
lands), so the clock keeps running while the run drains its in-flight requests after the
target is met, and shows that state as ``draining``. Every view shows the same fields
(``Snapshot``): accepted of target, rejected, retries, server errors (HTTP 429/5xx
answers), in flight of the limit, completion tokens/s, elapsed, and an ETA from the
acceptance rate over the last ``window_s`` seconds (not the whole run's average, which
lags behind a server that sped up or slowed down).

Modes: ``bar`` (rich live bar on stderr), ``log`` (one ``key=value`` line on stderr every
``interval_s`` seconds and at the end: for ``nohup``, CI and container logs) and ``off``.
``mode_for`` picks ``bar`` when stderr is a terminal and ``log`` when it is not.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Literal

from rich.console import Console
from rich.progress import BarColumn, TextColumn
from rich.progress import Progress as RichProgress

if TYPE_CHECKING:
    from dreamgen.pipeline import Run

Mode = Literal["bar", "log", "off"]
State = Literal["starting", "running", "draining", "done"]


@dataclass(frozen=True)
class Snapshot:
    """What every progress view shows, at one moment."""

    state: State
    total: int  # records in OUT (resumed + this run)
    target: int | None
    rejected: int
    retries: int
    server_errors: int
    in_flight: int
    limit: int
    tok_s: float  # completion tokens per second, this run
    elapsed_s: float
    eta_s: float | None  # None: no acceptance yet in the window, or no target

    def logfmt(self) -> str:
        """The snapshot as ``key=value`` fields (``none`` for a missing value)."""
        fields = asdict(self)
        fields["tok_s"] = round(self.tok_s, 1)
        fields["elapsed_s"] = round(self.elapsed_s, 1)
        fields["eta_s"] = None if self.eta_s is None else round(self.eta_s, 1)
        return " ".join(f"{k}={'none' if v is None else v}" for k, v in fields.items())


def fmt_duration(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RecentRate:
    """Acceptances per second over the last ``window_s`` seconds of samples."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class Progress:
    """Samples ``run`` every ``tick_s`` and renders it in ``mode`` (see the module doc)."""

    def __init__(
        self,
        run: Run,
        mode: Mode,
        *,
        interval_s: float = 10.0,
        window_s: float = 60.0,
        tick_s: float = 0.25,
        stream: IO[str] | None = None,
        console: Console | None = None,
    ) -> None:
        self.run = run
        self.mode = mode
        self.interval_s = interval_s
        self.tick_s = tick_s
        self.stream = stream or sys.stderr
        self.rate = RecentRate(window_s)
        self._started = False
        self._finished = False
        self._last_log = time.monotonic()
        self.bar = RichProgress(
            TextColumn("[bold]{task.fields[state]}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TextColumn("{task.fields[clock]}"),
            console=console or Console(stderr=True),
            disable=mode != "bar",
            transient=False,
            auto_refresh=False,
        )
        self.task = self.bar.add_task(
            "", total=run.config.count, state="starting", info="", clock=""
        )

    def snapshot(self) -> Snapshot:
        """The run's state now."""
        run, s = self.run, self.run.summary
        now = time.monotonic()
        self.rate.add(now, s.total)
        engine = run.engine
        if self._finished:
            state: State = "done"
        elif not self._started or engine is None:
            state = "starting"
        elif (run.reached or run.stop_event.is_set()) and run.inflight > 0:
            state = "draining"
        else:
            state = "running"
        target = run.config.count
        rate = self.rate.rate()
        eta: float | None = None
        if target is not None and state != "done" and not run.stop_event.is_set():
            left = max(0, target - s.total)
            eta = 0.0 if left == 0 else (left / rate if rate > 0 else None)
        return Snapshot(
            state=state,
            total=s.total,
            target=target,
            rejected=sum(s.rejected.values()),
            retries=engine.retries if engine is not None else 0,
            server_errors=engine.server_errors if engine is not None else 0,
            in_flight=run.inflight,
            limit=run.limit,
            tok_s=s.completion_tokens / max(s.elapsed_s, 1e-9),
            elapsed_s=s.elapsed_s,
            eta_s=eta,
        )

    def render(self, snap: Snapshot) -> None:
        """Show ``snap`` in this view's mode."""
        if self.mode == "bar":
            info = (
                f"rejected {snap.rejected} · retries {snap.retries} · "
                f"server errors {snap.server_errors} · in flight {snap.in_flight}/{snap.limit}"
                f" · {snap.tok_s:.0f} tok/s"
            )
            clock = f"{fmt_duration(snap.elapsed_s)} · ETA {fmt_duration(snap.eta_s)}"
            self.bar.update(
                self.task, completed=snap.total, state=snap.state, info=info, clock=clock
            )
            self.bar.refresh()
        elif self.mode == "log":
            ts = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            self.stream.write(f"{ts} progress {snap.logfmt()}\n")
            self.stream.flush()

    def tick(self) -> None:
        """Sample and render now if it is time (log lines every ``interval_s``)."""
        snap = self.snapshot()
        if self.mode == "log":
            now = time.monotonic()
            # The first line after one interval, not at once: a run that fails to start
            # (an unreachable server) ends in its one error line, nothing else.
            if now - self._last_log < self.interval_s:
                return
            self._last_log = now
        self.render(snap)

    async def follow(self) -> None:
        """Tick until cancelled (run it beside ``run.run()``)."""
        self._started = True
        while True:
            self.tick()
            await asyncio.sleep(self.tick_s)

    def __enter__(self) -> Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finished = True
        if self.run.summary.requests:  # a run that never sent a request has nothing to end
            self.render(self.snapshot())  # the last word: state done, the clock stopped
        self.bar.stop()


def mode_for(console: Console, *, quiet: bool) -> Mode:
    """``off`` when quiet, ``bar`` on a terminal, ``log`` otherwise."""
    if quiet:
        return "off"
    return "bar" if console.is_terminal else "log"
