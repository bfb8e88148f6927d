"""From a Config to a started engine: ``open_engine``, one opener per ``config.engine``.

Adding an engine is its module plus one opener, registered in ``OPENERS``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from dreamgen.config import Config
from dreamgen.engines.base import Engine
from dreamgen.engines.client import api_key_from_env
from dreamgen.engines.embedded import EMBEDDED_MODEL, EmbeddedServer
from dreamgen.engines.launcher import Launcher
from dreamgen.engines.offline import OfflineEngine
from dreamgen.engines.server import ServerEngine

OnEngine = Callable[[Engine], None] | None
Opened = contextlib.AbstractAsyncContextManager[tuple[Engine, int]]


@contextlib.asynccontextmanager
async def open_engine(
    config: Config,
    *,
    wait: bool = False,
    on_engine: OnEngine = None,
) -> AsyncIterator[tuple[Engine, int]]:
    """Start the configured engine; yields it with its initial in-flight limit.

    Server engines (embedded, openai) carry a ``gate``: their live limit, which adapts to
    the server's load and drops to zero while no server is healthy. ``wait`` waits out a
    server that is down or still loading (the daemon) instead of failing with one clear
    line (a build). ``on_engine`` sees the engine before it is ready (for /readyz).
    """
    opener = _open_ray if config.executor.kind == "ray" else OPENERS[config.engine]
    async with opener(config, wait, on_engine) as opened:
        yield opened


@contextlib.asynccontextmanager
async def _open_offline(
    config: Config, wait: bool, on_engine: OnEngine
) -> AsyncIterator[tuple[Engine, int]]:
    offline = OfflineEngine(config)
    if on_engine is not None:
        on_engine(offline)
    await offline.start()
    try:
        yield offline, config.concurrency
    finally:
        await offline.close()


@contextlib.asynccontextmanager
async def _open_embedded(
    config: Config, wait: bool, on_engine: OnEngine
) -> AsyncIterator[tuple[Engine, int]]:
    server = EmbeddedServer(parallel=config.embedded_parallel, threads=config.embedded_threads)
    serving = config.serving
    try:
        await asyncio.to_thread(server.start)
        # llama.cpp queues what its slots cannot take; more in flight only adds latency.
        engine = ServerEngine(
            [server.url],
            EMBEDDED_MODEL,
            name="embedded",
            concurrency=config.concurrency,
            hard_cap=2 * config.embedded_parallel,
            timeout_s=config.request_timeout_s,
            max_attempts=config.max_attempts,
            health_interval_s=serving.health_interval_s,
            backoff_max_s=serving.outage_backoff_max_s,
        )
        # The server is ours and loading: always wait for it, up to two minutes.
        async with _started(engine, on_engine, wait=True, timeout_s=120.0) as opened:
            yield opened
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def _open_openai(
    config: Config, wait: bool, on_engine: OnEngine
) -> AsyncIterator[tuple[Engine, int]]:
    serving = config.serving
    launcher: Launcher | None = None
    if serving.launch:
        launcher = Launcher(
            serving.launch,
            log_path=serving.launch_log or config.out / "server.log",
            stop_grace_s=serving.stop_grace_s,
            backoff_s=serving.restart_backoff_s,
            backoff_max_s=serving.restart_backoff_max_s,
            max_failures=None if wait else 3,
        )
    try:
        if launcher is not None:
            await launcher.start()
        engine = ServerEngine(
            config.servers,
            config.model_name,
            api_key=api_key_from_env(config.api_key_env),
            concurrency=config.concurrency,
            adaptive=config.adaptive,
            adapt=config.adapt,
            timeout_s=config.request_timeout_s,
            max_attempts=config.max_attempts,
            health_interval_s=serving.health_interval_s,
            backoff_max_s=serving.outage_backoff_max_s,
            guided=serving.guided_decoding,
            schema_dialect=serving.schema_dialect,
            launcher=launcher,
            max_response_bytes=serving.max_response_bytes,
        )
        # A launched server is loading: wait for it (a build, up to launch_timeout_s).
        timeout = serving.launch_timeout_s if launcher and not wait else None
        async with _started(
            engine, on_engine, wait=wait or launcher is not None, timeout_s=timeout
        ) as opened:
            yield opened
    finally:
        if launcher is not None:
            await launcher.stop()


@contextlib.asynccontextmanager
async def _started(
    engine: ServerEngine, on_engine: OnEngine, *, wait: bool, timeout_s: float | None
) -> AsyncIterator[tuple[Engine, int]]:
    if on_engine is not None:
        on_engine(engine)
    try:
        await engine.start(wait=wait, timeout_s=timeout_s)
    except BaseException:
        await engine.close()
        raise
    try:
        yield engine, engine.limit
    finally:
        await engine.close()


@contextlib.asynccontextmanager
async def _open_ray(
    config: Config, wait: bool, on_engine: OnEngine
) -> AsyncIterator[tuple[Engine, int]]:
    # The configured engine runs in Ray worker actors; each worker opens it with this
    # factory (as a local engine), so every engine above scales out unchanged.
    from dreamgen.engines.ray_executor import RayEngine

    engine = RayEngine(config)
    if on_engine is not None:
        on_engine(engine)
    try:
        await engine.start()
        yield engine, engine.limit
    finally:
        await engine.close()


OPENERS: dict[str, Callable[[Config, bool, OnEngine], Opened]] = {
    "embedded": _open_embedded,
    "openai": _open_openai,
    "vllm-offline": _open_offline,
}
