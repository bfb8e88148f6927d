"""Servers that misbehave, both ways: bounded reads from a hostile engine server, and the
daemon's own health server under a connection flood; logs rate-limited per message.

The hostile server is a real aiohttp server on 127.0.0.1 in its own process; the client
runs in another process so its peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dreamgen.engines.bounded import response_cap, token_count
from dreamgen.logs import setup_logging
from dreamgen.metrics import Metrics, MetricsServer

ROOT = Path(__file__).resolve().parent.parent

HOSTILE = r"""
import asyncio, sys, zlib, orjson
from aiohttp import web

MB = 1 << 20
def completion(usage=None):
    body = {"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}]}
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)

def gzip_bomb(size):
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = b"\0" * MB
    return b"".join(c.compress(zero) for _ in range(size // MB)) + c.flush()

BOMB = gzip_bomb(300 * MB)

async def chat(request):
    kind = request.match_info["kind"]
    if kind == "big":  # 100 MB, with its Content-Length
        return web.Response(body=b" " * (100 * MB), content_type="application/json")
    if kind in ("big-chunked", "endless"):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b" " * MB
        sent = 0
        while kind == "endless" or sent < 100 * MB:
            await resp.write(chunk)
            sent += len(chunk)
        return resp
    if kind == "bomb":
        return web.Response(body=BOMB, headers={"Content-Encoding": "gzip",
                                                 "Content-Type": "application/json"})
    if kind == "hugeint":  # past 64 bits: orjson cannot write it, so by hand
        return web.Response(body=b'{"choices":[{"message":{"content":"{}"}}],'
            b'"usage":{"prompt_tokens":1000000000000000000000000000000,'
            b'"completion_tokens":1180591620717411303424}}', content_type="application/json")
    if kind == "nanint":
        return web.Response(body=b'{"choices":[{"message":{"content":"{}"}}],'
            b'"usage":{"prompt_tokens":-5,"completion_tokens":"many"}}',
            content_type="application/json")
    return web.Response(body=completion({"prompt_tokens": 3, "completion_tokens": 2}),
                        content_type="application/json")

async def models(request):
    if request.match_info["kind"] == "models-list":
        return web.json_response([1, 2, 3])
    return web.json_response({"data": [{"id": "m"}]})

async def metrics(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    while True:
        await resp.write(b"vllm:num_requests_running 1\n" * 4096)

async def health(request):
    return web.Response(text="ok")

app = web.Application()
app.add_routes([web.post("/{kind}/v1/chat/completions", chat),
                web.get("/{kind}/v1/models", models),
                web.get("/{kind}/metrics", metrics),
                web.get("/{kind}/health", health)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: print("up", flush=True))
"""

CLIENT = r"""
import asyncio, json, resource, sys
from dreamgen.engines.base import EngineError
from dreamgen.engines.client import OpenAIClient

def rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

async def main(url, n):
    base = rss_kb()
    async with OpenAIClient(url, "m", concurrency=8, timeout_s=60, max_attempts=2,
                            backoff_s=0.01) as client:
        async def one():
            try:
                c = await client.chat([{"role": "user", "content": "hi"}],
                                      sampling={"max_tokens": 1200})
                return ["ok", c.prompt_tokens, c.completion_tokens]
            except EngineError as exc:
                return ["error", str(exc)]
        results = await asyncio.gather(*[one() for _ in range(n)])
    print(json.dumps({"results": results, "base_kb": base, "peak_kb": rss_kb()}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOSTILE, str(port)], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def _limit_memory() -> None:  # a safety net: a regression must fail, not swap the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def client(url: str, n: int = 4) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, url, str(n)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, preexec_fn=_limit_memory,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", ["big", "big-chunked", "endless", "bomb"])
def test_hostile_bodies_cost_bounded_memory_and_are_counted_errors(hostile: str, kind: str):
    out = client(f"{hostile}/{kind}")
    results = out["results"]
    assert [r[0] for r in results] == ["error"] * 4, results
    assert all(("cap" in r[1]) or ("bomb" in r[1]) for r in results), results
    grew_mb = (out["peak_kb"] - out["base_kb"]) / 1024
    # Four requests in flight, each read at most to the cap (~4 MB): tens of MB, not GBs.
    assert grew_mb < 60, f"peak RSS grew {grew_mb:.0f} MB"


def test_token_counts_from_the_server_are_clamped(hostile: str) -> None:
    assert client(f"{hostile}/hugeint", 1)["results"] == [["ok", 1 << 24, 1200]]
    assert client(f"{hostile}/nanint", 1)["results"] == [["ok", 0, 0]]
    assert token_count(float("nan")) == 0 and token_count(True) == 0 and token_count(7.0) == 7


def test_the_default_cap_is_a_few_mb_beyond_max_tokens() -> None:
    assert response_cap(1200) == (4 << 20) + 1200 * 64
    assert response_cap(1200, 1 << 20) == 1 << 20


def test_models_answering_a_non_object_is_one_engine_error(hostile: str) -> None:
    from dreamgen.engines.base import EngineError
    from dreamgen.engines.client import OpenAIClient

    async def main() -> str:
        async with OpenAIClient(f"{hostile}/models-list", "m") as c:
            try:
                await c.served_models()
            except EngineError as exc:
                return str(exc)
        return "no error"

    assert "not a list" in asyncio.run(main())


def test_an_endless_metrics_page_is_capped_and_the_server_stays_up(hostile: str) -> None:
    from dreamgen.engines.server import ServerEngine

    async def main() -> tuple[bool, bool]:
        engine = ServerEngine([f"{hostile}/ok"], "m", adaptive=True, health_interval_s=0.2)
        async with engine:
            await asyncio.sleep(1.0)
            completion = await engine.chat([{"role": "user", "content": "hi"}])
            return engine.ready and completion.content == "{}", engine.replicas[0].metrics_ok

    t0 = time.monotonic()
    ready, metrics_ok = asyncio.run(main())
    assert ready and not metrics_ok and time.monotonic() - t0 < 30


# -- the daemon's own server -------------------------------------------------------------


def test_metrics_server_caps_connections_and_closes_idle_ones() -> None:
    async def main() -> tuple[int, int, int, int]:
        server = MetricsServer(Metrics(), port=0, max_connections=16, idle_s=1.0)
        await server.start()
        try:
            conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(200)]

            async def closed(reader: asyncio.StreamReader, wait: float) -> bool:
                try:
                    return await asyncio.wait_for(reader.read(1), wait) == b""
                except TimeoutError:
                    return False
                except ConnectionError:
                    return True

            at_once = sum(await asyncio.gather(*(closed(r, 0.5) for r, _ in conns)))
            later = sum(await asyncio.gather(*(closed(r, 3.0) for r, _ in conns)))
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status = (await asyncio.wait_for(reader.readline(), 5)).split()[1]
            for _, w in conns:
                w.close()
            writer.close()
            assert server.server is not None
            return at_once, later, int(status), server.server.idle_closed
        finally:
            await server.stop()

    at_once, later, status, idle_closed = asyncio.run(main())
    assert at_once >= 200 - 16  # over the cap: closed at once
    assert later == 200 and idle_closed >= 16  # the idle ones too, after idle_s
    assert status == 200  # and the server still answers


def test_logs_are_rate_limited_per_message(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    root = logging.getLogger("dreamgen")
    try:
        setup_logging("json", "info", path)
        log = logging.getLogger("dreamgen.test")
        for i in range(2000):
            log.warning("engine error: %s", i)
            log.info("shard closed %d", i)  # events below WARNING are never dropped
        log.warning("another message")
        lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        root.propagate = True
        root.setLevel(logging.NOTSET)
    warnings = [ln["msg"] for ln in lines if ln["level"] == "warning"]
    assert len(warnings) <= 6 and warnings[-1] == "another message"
    assert sum(ln["level"] == "info" for ln in lines) == 2000
