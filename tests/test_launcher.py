"""The launched server: start, log file, restart with backoff, SIGTERM then SIGKILL, give up.

A stand-in command (a tiny Python HTTP server that answers /health, then dies or ignores
SIGTERM as told) plays `vllm serve`; the simulated vLLM server plays it end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from dreamgen.audit import audit
from dreamgen.engines import EngineError, Launcher, ServerEngine

ROOT = Path(__file__).resolve().parent.parent

STANDIN = textwrap.dedent(
    """
    import http.server, os, signal, sys, threading, time
    port, die_after, ignore_term = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if die_after == 0:  # a server that fails at startup (bad flag, no GPU, ...)
        print("stand-in dying: bad startup", flush=True)
        os._exit(3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    srv.allow_reuse_address = True
    print(f"stand-in pid {os.getpid()} serving on {port}", flush=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    if die_after >= 0:
        time.sleep(die_after)
        print("stand-in dying", flush=True)
        os._exit(3)
    while True:
        time.sleep(1)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def standin(tmp: Path, port: int, die_after: float = -1, ignore_term: bool = False) -> list[str]:
    script = tmp / "standin.py"
    script.write_text(STANDIN)
    return [sys.executable, str(script), str(port), str(die_after), "1" if ignore_term else "0"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def pid(launcher: Launcher) -> int | None:
    return launcher.proc.pid if launcher.proc is not None else None


async def wait_healthy(launcher: Launcher, url: str, timeout_s: float) -> None:
    """Poll ``url``/health until 200; EngineError on timeout or when the launcher gave up."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while True:
            if launcher.failed:
                raise EngineError(launcher.failure_message())
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with s.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise EngineError(f"the launched server did not answer {url}/health in time")
            await asyncio.sleep(0.5)


async def test_restarts_a_dying_server_with_backoff_and_logs_it(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    launcher = Launcher(
        standin(tmp_path, port, die_after=0.6), log_path=log, backoff_s=0.2, backoff_max_s=5
    )
    await launcher.start()
    try:
        await wait_healthy(launcher, f"http://127.0.0.1:{port}", timeout_s=10)
        first = pid(launcher)
        await until(lambda: launcher.restarts >= 2, timeout=15)
        assert pid(launcher) != first and launcher.last_exit == 3
        # Quick deaths in a row double the wait: 0.2 s, then 0.4 s, ...
        assert launcher.failures >= 2
        await wait_healthy(launcher, f"http://127.0.0.1:{port}", timeout_s=10)
    finally:
        last = pid(launcher)
        await launcher.stop(grace_s=5)
    assert last is not None and not alive(last)
    text = log.read_text()
    assert "=== dreamgen: start 1" in text and "=== dreamgen: start 3" in text
    assert text.count("stand-in dying") >= 2 and "serving on" in text
    assert launcher.state == "stopped"


async def test_stop_sends_sigterm_then_sigkill(tmp_path: Path) -> None:
    polite = Launcher(standin(tmp_path, free_port()), log_path=tmp_path / "a.log")
    await polite.start()
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    assert await polite.stop(grace_s=10) == -signal.SIGTERM
    assert time.monotonic() - t0 < 5

    stubborn = Launcher(
        standin(tmp_path, free_port(), ignore_term=True), log_path=tmp_path / "b.log"
    )
    await stubborn.start()
    await asyncio.sleep(0.5)  # let it install its SIGTERM handler
    child = pid(stubborn)
    t0 = time.monotonic()
    assert await stubborn.stop(grace_s=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - t0 < 5
    assert child is not None and not alive(child)
    # Stopping twice is harmless, and nothing restarts a stopped server.
    assert await stubborn.stop() == -signal.SIGKILL
    await asyncio.sleep(0.3)
    assert stubborn.restarts == 0


async def test_gives_up_after_repeated_quick_deaths(tmp_path: Path) -> None:
    port = free_port()
    launcher = Launcher(
        standin(tmp_path, port, die_after=0),
        log_path=tmp_path / "server.log",
        backoff_s=0.05,
        max_failures=3,
    )
    await launcher.start()
    with pytest.raises(EngineError) as err:
        await wait_healthy(launcher, f"http://127.0.0.1:{port}", timeout_s=20)
    assert launcher.failed
    msg = str(err.value)
    assert "exited 3 times (last exit code 3)" in msg and "server.log" in msg
    assert "stand-in dying" in msg  # the log's last lines say why
    await launcher.stop()


async def test_a_missing_command_is_one_clear_error(tmp_path: Path) -> None:
    launcher = Launcher("no-such-vllm-binary serve m", log_path=tmp_path / "s.log")
    with pytest.raises(EngineError, match="cannot launch 'no-such-vllm-binary'"):
        await launcher.start()


async def test_engine_rides_out_a_crash_of_the_launched_server(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "tests" / "fake_vllm.py"), "--port", str(port)]
    launcher = Launcher([*cmd, "--profile", "stress"], log_path=tmp_path / "s.log", backoff_s=0.2)
    await launcher.start()
    url = f"http://127.0.0.1:{port}"
    engine = ServerEngine(
        [url], "dreamgen-sim", launcher=launcher, health_interval_s=0.1, backoff_max_s=0.3
    )
    try:
        await engine.start(wait=True, timeout_s=30)
        await engine.chat([{"role": "user", "content": "hi"}])
        child = pid(launcher)
        assert child is not None
        os.kill(child, signal.SIGKILL)  # the server crashes
        await until(lambda: not engine.ready, timeout=10)
        await until(lambda: launcher.restarts == 1 and engine.ready, timeout=30)
        c = await engine.chat([{"role": "user", "content": "hi"}])
        assert c.finish_reason == "stop"
        assert engine.outages == 1
    finally:
        await engine.close()
        await launcher.stop(grace_s=5)


def test_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    port = free_port()
    parent = tmp_path / "parent.py"
    parent.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {str(ROOT)!r})
            from dreamgen.engines import Launcher
            async def main():
                launcher = Launcher({shlex.join(standin(tmp_path, port))!r},
                                    log_path={str(tmp_path / "s.log")!r})
                await launcher.start()
                print(launcher.proc.pid, flush=True)
                await asyncio.sleep(3600)
            asyncio.run(main())
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert alive(child)
    proc.kill()  # SIGKILL: no chance to stop the child itself
    proc.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_build_with_launch_starts_and_stops_the_server(tmp_path: Path) -> None:
    port = free_port()
    sim = f"{sys.executable} {ROOT / 'tests' / 'fake_vllm.py'} --port {port} --profile stress"
    sim += " --model dreamgen-sim"  # where --launch finds the model name
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamgen",
            "build",
            "--launch",
            sim,
            "--count",
            "20",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    valid, problems = audit(out)
    assert (valid, problems) == (20, [])
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["config"]["model"] == "dreamgen-sim"
    log = (out / "server.log").read_text()
    assert "=== dreamgen: start 1" in log and "dreamgen-sim" in log
    with socket.socket() as s:  # the server is gone: its port is free again
        s.bind(("127.0.0.1", port))
