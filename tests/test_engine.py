"""The OpenAI-compatible client against a real local HTTP server that misbehaves on cue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from dreamgen.engines import EngineError, OpenAIClient, RetryBudget

OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


class Script:
    """A server that answers each chat request with the next scripted behaviour."""

    def __init__(self) -> None:
        self.plan: list[str] = []
        self.hits = 0
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.bodies.append(orjson.loads(await request.read()))
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "429":
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": "0"}
            )
        if step.isdigit():
            return web.json_response({"error": {"message": f"boom {step}"}}, status=int(step))
        if step == "stall":
            await asyncio.sleep(1)
        if step == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if step == "garbage":
            return web.Response(body=b"<html>proxy error</html>", content_type="text/html")
        return web.json_response(OK)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Script]]:
    script = Script()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", script.chat)
    app.router.add_get("/v1/models", script.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", script
    await runner.cleanup()


def engine(url: str, **kw: Any) -> OpenAIClient:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.05)
    return OpenAIClient(url, "m", **kw)


async def check(client: OpenAIClient) -> None:
    """Fail with one clear line if the server is down or lacks the client's model."""
    served = await client.served_models()
    if client.model not in served:
        raise EngineError(
            f"model {client.model!r} is not served by {client.base_url}; it serves: "
            + (", ".join(served) or "nothing")
        )


async def test_transient_failures_are_retried_then_succeed(server: tuple[str, Script]) -> None:
    url, script = server
    script.plan = ["429", "500", "503", "reset", "garbage"]
    async with engine(url) as e:
        out = await e.chat([{"role": "user", "content": "hi"}], sampling={"temperature": 0.1})
    assert out.content == "{}" and out.finish_reason == "stop"
    assert (out.prompt_tokens, out.completion_tokens) == (11, 7)
    assert script.hits == 6 and e.retries == 5
    assert script.bodies[-1]["temperature"] == 0.1 and script.bodies[-1]["stream"] is False


async def test_timeouts_are_retried(server: tuple[str, Script]) -> None:
    url, script = server
    script.plan = ["stall"]
    async with engine(url, timeout_s=0.3) as e:
        out = await e.chat([{"role": "user", "content": "hi"}])
    assert out.content == "{}" and script.hits == 2


async def test_client_errors_are_not_retried(server: tuple[str, Script]) -> None:
    url, script = server
    script.plan = ["400"]
    async with engine(url) as e:
        with pytest.raises(EngineError, match="HTTP 400.*boom 400"):
            await e.chat([{"role": "user", "content": "hi"}])
    assert script.hits == 1


async def test_attempts_end(server: tuple[str, Script]) -> None:
    url, script = server
    script.plan = ["502"] * 10
    async with engine(url, max_attempts=3) as e:
        with pytest.raises(EngineError, match="gave up"):
            await e.chat([{"role": "user", "content": "hi"}])
    assert script.hits == 3


async def test_retry_budget_ends_retries_across_requests(server: tuple[str, Script]) -> None:
    url, script = server
    script.plan = ["500"] * 100
    async with engine(url, max_attempts=10) as e:
        e.budget = RetryBudget(ratio=0.0, reserve=3)
        for _ in range(3):
            with pytest.raises(EngineError):
                await e.chat([{"role": "user", "content": "hi"}])
    # 3 requests plus a budget of 3 retries in all, not 3 x 10 attempts.
    assert script.hits == 6


async def test_check_names_served_models_and_unreachable_servers(
    server: tuple[str, Script],
) -> None:
    url, _ = server
    async with OpenAIClient(url, "other") as e:
        with pytest.raises(EngineError, match="'other' is not served.*it serves: m"):
            await check(e)
    async with OpenAIClient("http://127.0.0.1:9", "m") as e:
        with pytest.raises(EngineError, match="cannot reach"):
            await check(e)


async def test_api_key_is_sent_but_never_shown(server: tuple[str, Script]) -> None:
    url, _ = server
    e = engine(url, api_key="sk-secret")
    assert "sk-secret" not in repr(e)
