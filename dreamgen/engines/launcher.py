"""A launched server: ``vllm serve …`` (or any server command) as a supervised child.

``Launcher`` starts the command as a child process in its own process group, streams its
log to a file, restarts it with backoff when it dies and stops it (SIGTERM, then SIGKILL)
on exit. ``ServerEngine`` watches the server it serves through ``/health`` like any other;
it reads the launcher's state to say why it is not ready, and gives up when it failed.
``parse_launch`` (in ``dreamgen.serving``, so the config can use it) reads where the
command will serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from dreamgen.engines.aio import wait_event
from dreamgen.engines.base import EngineError
from dreamgen.logs import event
from dreamgen.serving import LaunchInfo, parse_launch

__all__ = ["LaunchInfo", "Launcher", "parse_launch"]

# The log name predates this package; log queries match on it.
log = logging.getLogger("dreamgen.vllm")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if dreamgen dies without stopping it (SIGKILL, crash)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Launcher:
    """Start a server command as a child and keep it running.

    The child gets its own process group (its workers are stopped with it); its stdout
    and stderr go to ``log_path`` (appended, one header line per start). When it exits
    unasked, it is restarted after a backoff that doubles with each quick death (one that
    ran less than ``stable_s``) up to ``backoff_max_s``. ``max_failures`` quick deaths
    in a row give up (``failed``); None never gives up (a daemon). ``stop`` sends SIGTERM
    to the group, then SIGKILL after ``stop_grace_s``.
    """

    def __init__(
        self,
        command: str | list[str],
        *,
        log_path: Path,
        stop_grace_s: float = 30.0,
        backoff_s: float = 2.0,
        backoff_max_s: float = 120.0,
        stable_s: float = 60.0,
        max_failures: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        self.log_path = Path(log_path)
        self.stop_grace_s = stop_grace_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.max_failures = max_failures
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.restarts = 0
        self.failures = 0  # quick deaths in a row
        self.last_exit: int | None = None
        self.state = "stopped"  # stopped | running | restarting | failed
        self.started_at = 0.0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._stop_event = asyncio.Event()

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def failure_message(self) -> str:
        tail = self.log_tail(3)
        last = f"; last log lines: {' | '.join(tail)}" if tail else ""
        return (
            f"the launched server ({shlex.join(self.argv[:3])} …) exited {self.failures} times "
            f"(last exit code {self.last_exit}); see {self.log_path}{last}"
        )

    def log_tail(self, n: int) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("=== ")][-n:]

    async def start(self) -> None:
        """Start the child and its supervisor; raises EngineError if it cannot be spawned."""
        self._stopping = False
        self._stop_event.clear()
        await self._spawn()
        self._task = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as logf:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            header = f"=== dreamgen: start {self.starts} at {stamp}: {shlex.join(self.argv)}\n"
            logf.write(header.encode())
            logf.flush()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    env=self.env,
                )
            except OSError as exc:
                self.state = "failed"
                raise EngineError(f"cannot launch {self.argv[0]!r}: {exc.strerror or exc}") from exc
        self.started_at = time.monotonic()
        self.state = "running"
        event(
            log,
            logging.INFO, "server_launched", "launched server pid %d (log: %s)",
            self.proc.pid, self.log_path, pid=self.proc.pid, log=str(self.log_path),
        )  # fmt: skip

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                break
            self.last_exit = code
            ran = time.monotonic() - self.started_at
            self.failures = 0 if ran >= self.stable_s else self.failures + 1
            if self.max_failures is not None and self.failures >= self.max_failures:
                self.state = "failed"
                event(log, logging.ERROR, "server_failed", "%s", self.failure_message(), code=code)
                return
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, self.failures - 1))
            self.state = "restarting"
            event(log,
                logging.WARNING, "server_exited",
                "launched server exited with code %s after %.1fs; restarting in %.1fs",
                code, ran, delay, code=code, ran_s=round(ran, 2), restart_in_s=round(delay, 2),
            )  # fmt: skip
            await wait_event(self._stop_event, delay)
            if self._stopping:
                break
            try:
                await self._spawn()
            except EngineError as exc:
                event(log, logging.ERROR, "server_failed", "%s", exc)
                return
            self.restarts += 1

    async def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM the child's process group, SIGKILL after the grace; returns its exit code."""
        self._stopping = True
        self._stop_event.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        proc = self.proc
        self.state = "stopped"
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        grace = self.stop_grace_s if grace_s is None else grace_s
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                code = await proc.wait()
        except TimeoutError:
            event(log,
                logging.WARNING, "server_killed",
                "launched server ignored SIGTERM for %.1fs: SIGKILL", grace,
            )  # fmt: skip
            _signal_group(proc.pid, signal.SIGKILL)
            code = await proc.wait()
        event(
            log,
            logging.INFO,
            "server_stopped",
            "launched server stopped (code %s)",
            code,
            code=code,
        )
        return code


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
