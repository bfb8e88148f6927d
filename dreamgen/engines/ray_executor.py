"""Scale out on Ray: the configured engine runs in N worker actors across a cluster.

The executor is an engine: ``RayEngine`` is what the pipeline talks to, and each chat is
sent to one of N ``EngineWorker`` actors, each of which opens the configured engine
(``open_engine``: a vLLM replica URL per worker, the embedded llama.cpp server per worker,
or ``vllm-offline`` in a GPU actor) and keeps its own bounded in-flight window. Everything
else stays in the driver and is the same code as a local build: the planner is the single
source of quotas, the stage chain (validate, filters, one global dedup) and the one store
writer keep the durability contract exactly (reported only after fsync, exactly-once on
resume). So a driver killed with SIGKILL resumes like any build.

Failures beyond Ray Data LLM's: a worker that dies (or is killed) is replaced and its
in-flight requests are re-issued to another worker; a request that kills
``poison_attempts`` workers is rejected as poison instead of killing workers forever.
Workers are named ``dreamgen-worker-<i>`` in the ``dreamgen`` namespace, so an operator
(or a test) can find them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dreamgen.engines.base import Completion, Engine, EngineError
from dreamgen.logs import event

if TYPE_CHECKING:
    from dreamgen.config import Config

log = logging.getLogger("dreamgen.ray")
NAMESPACE = "dreamgen"


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise EngineError("the Ray executor needs Ray: pip install 'dreamgen[ray]'") from exc
    return ray


def worker_config(config: Config, index: int) -> Config:
    """The config one worker opens its engine with: a local engine (no executor); for a
    server engine one replica URL per worker (round-robin when there are fewer); for the
    embedded engine as many llama.cpp threads as the worker reserves CPUs, so several
    workers on one node share its cores instead of each taking all of them."""
    ex = config.executor
    update: dict[str, Any] = {"executor": ex.model_copy(update={"kind": "local"})}
    if config.engine == "openai" and config.servers:
        update["servers"] = [config.servers[index % len(config.servers)]]
    if config.engine == "embedded" and config.embedded_threads is None:
        update["embedded_threads"] = max(1, round(ex.worker_cpus))
    return config.model_copy(update=update)


class EngineWorker:
    """A Ray actor holding one started engine (the class is wrapped by ``ray.remote``)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stack = contextlib.AsyncExitStack()
        self.engine: Engine | None = None

    async def start(self) -> tuple[str, str, int]:
        from dreamgen.engines.factory import open_engine

        engine, limit = await self.stack.enter_async_context(open_engine(self.config))
        self.engine = engine
        return engine.name, engine.model, limit

    async def chat(
        self,
        messages: list[dict[str, str]],
        response_format: dict[str, Any] | None,
        sampling: dict[str, Any] | None,
    ) -> Completion:
        assert self.engine is not None, "start() first"
        return await self.engine.chat(messages, response_format=response_format, sampling=sampling)

    async def close(self) -> None:
        await self.stack.aclose()


@dataclass
class _Worker:
    index: int
    actor: Any
    slots: asyncio.Semaphore
    limit: int
    inflight: int = 0


class RayEngine(Engine):
    """The pipeline's engine; chats run in worker actors (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        ex = config.executor
        self.workers_wanted = ex.workers
        self.poison_attempts = ex.poison_attempts
        self.name = config.engine  # records look the same as from a local build
        self.model = config.model_name
        self.workers: list[_Worker] = []
        self.replaced = 0  # workers replaced after dying
        self._ray: Any = None
        self._lock = asyncio.Lock()

    @property
    def limit(self) -> int:
        """The in-flight window: the sum of the workers' own windows."""
        return sum(w.limit for w in self.workers)

    async def start(self) -> None:
        ray = self._ray = import_ray()
        ex = self.config.executor
        if not ray.is_initialized():
            try:
                ray.init(
                    address=ex.ray_address,
                    namespace=NAMESPACE,
                    include_dashboard=False,
                    log_to_driver=False,
                    ignore_reinit_error=True,
                )
            except Exception as exc:  # ConnectionError, RuntimeError: no cluster there
                raise EngineError(f"cannot reach the Ray cluster {ex.ray_address}: {exc}") from None
        for i in range(self.workers_wanted):
            self.workers.append(await self._spawn(i))
        event(log, logging.INFO, "ray_ready", "%d Ray workers ready", len(self.workers),
              workers=len(self.workers), limit=self.limit)  # fmt: skip

    async def _spawn(self, index: int) -> _Worker:
        ray = self._ray
        ex = self.config.executor
        cls = ray.remote(EngineWorker)
        name = f"dreamgen-worker-{index}"
        with contextlib.suppress(ValueError):  # a dead predecessor may still hold the name
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        actor = cls.options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=ex.worker_cpus,
            num_gpus=ex.worker_gpus,
            max_concurrency=max(4, 2 * self.config.concurrency),
            lifetime=None,
        ).remote(worker_config(self.config, index))
        try:
            _, _, limit = await actor.start.remote()
        except Exception as exc:
            with contextlib.suppress(Exception):
                ray.kill(actor)
            raise EngineError(f"Ray worker {index} could not start its engine: {exc}") from None
        limit = max(1, min(limit, self.config.concurrency))
        return _Worker(index, actor, asyncio.Semaphore(limit), limit)

    async def _replace(self, dead: _Worker) -> None:
        async with self._lock:
            if dead not in self.workers:
                return  # another request already replaced it
            self.workers.remove(dead)
            self.replaced += 1
            self.outages += 1
            event(log, logging.WARNING, "ray_worker_died",
                  "Ray worker %d died; starting a replacement", dead.index,
                  worker=dead.index)  # fmt: skip
            self.workers.append(await self._spawn(dead.index))

    def _pick(self) -> _Worker:
        return min(self.workers, key=lambda w: w.inflight / w.limit)

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        ray = self._ray
        deaths = 0
        while True:
            if not self.workers:
                raise EngineError("no Ray worker is running")
            worker = self._pick()
            async with worker.slots:
                worker.inflight += 1
                try:
                    return await worker.actor.chat.remote(messages, response_format, sampling)
                except ray.exceptions.RayActorError:
                    deaths += 1
                finally:
                    worker.inflight -= 1
            if deaths >= self.poison_attempts:
                await self._replace(worker)
                raise EngineError(f"poison request: {deaths} Ray workers died serving it; rejected")
            await self._replace(worker)  # then re-issue the request to a live worker

    async def close(self) -> None:
        if self._ray is None:
            return
        for w in self.workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.actor.close.remote(), timeout=30)
            with contextlib.suppress(Exception):
                self._ray.kill(w.actor)
        self.workers = []
