"""The generation loop: plan → engine → validate & label → filter & dedup → store.

One code path for `dreamgen build`, the daemon and library callers. A bounded window of
requests is in flight (never a whole plan gathered at once); accepted records are
reported only after the store has fsynced them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dreamgen import filters
from dreamgen.cards import CardSet
from dreamgen.config import Config
from dreamgen.dedup import Dedup, conversation_text, exact_key
from dreamgen.engines import (
    EMBEDDED_MODEL,
    Completion,
    EmbeddedServer,
    EngineError,
    OpenAIEngine,
    api_key_from_env,
)
from dreamgen.planner import Planner, Request
from dreamgen.record import Record, split_for
from dreamgen.scenario import response_format
from dreamgen.store import Store
from dreamgen.validate import Rejected, validate

log = logging.getLogger("dreamgen.pipeline")


class Engine(Protocol):
    """What the pipeline needs from an engine."""

    name: str
    model: str

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> Completion: ...


@dataclass
class Summary:
    """Counts for one run, plus the totals the store already held when it started."""

    target: int | None
    resumed: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    coverage: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "target"

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def total(self) -> int:
        return self.resumed + self.accepted

    def as_dict(self) -> dict[str, Any]:
        el = max(self.elapsed_s, 1e-9)
        return {
            "target": self.target,
            "resumed": self.resumed,
            "accepted": self.accepted,
            "total": self.total,
            "rejected": dict(sorted(self.rejected.items())),
            "requests": self.requests,
            "yield": round(self.accepted / self.requests, 4) if self.requests else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "accepted_tokens": self.accepted_tokens,
            "elapsed_s": round(el, 2),
            "accepted_per_s": round(self.accepted / el, 3),
            "accepted_tokens_per_s": round(self.accepted_tokens / el, 1),
            "completion_tokens_per_s": round(self.completion_tokens / el, 1),
            "stopped_by": self.stopped_by,
        }


@contextlib.asynccontextmanager
async def open_engine(config: Config) -> AsyncIterator[tuple[Engine, int]]:
    """Start the configured engine; yields it with the in-flight limit that suits it."""
    if config.engine == "embedded":
        server = EmbeddedServer(parallel=config.embedded_parallel)
        await asyncio.to_thread(server.start)
        try:
            # llama.cpp queues what its slots cannot take; more in flight only adds latency.
            limit = min(config.concurrency, 2 * config.embedded_parallel)
            async with OpenAIEngine(
                server.url,
                EMBEDDED_MODEL,
                concurrency=limit,
                timeout_s=config.request_timeout_s,
                max_attempts=config.max_attempts,
            ) as engine:
                engine.name = "embedded"
                yield engine, limit
        finally:
            await asyncio.to_thread(server.stop)
    elif config.engine == "openai":
        async with OpenAIEngine(
            config.servers[0],
            config.model_name,
            api_key=api_key_from_env(config.api_key_env),
            concurrency=config.concurrency,
            timeout_s=config.request_timeout_s,
            max_attempts=config.max_attempts,
        ) as engine:
            await engine.check()
            yield engine, config.concurrency
    else:
        from dreamgen.offline import OfflineEngine

        engine_off = OfflineEngine(config)
        yield engine_off, config.concurrency


class Run:
    """One run of the generation loop over one output folder."""

    def __init__(
        self,
        config: Config,
        *,
        on_record: Callable[[Record], Any] | None = None,
        on_progress: Callable[[Summary], Any] | None = None,
        hold: Callable[[], bool] | None = None,
        force: bool = False,
    ) -> None:
        self.config = config
        self.on_record = on_record
        self.on_progress = on_progress
        self.hold = hold  # backpressure: while it returns True, no new requests are issued
        self.cards = CardSet.load(config.prompts)
        self.store = Store(
            config.out,
            config=config.data_config(),
            fingerprint=config.fingerprint(self.cards.fingerprint),
            shard_records=config.store.shard_records,
            shard_age_s=config.store.shard_age_s,
            force=force,
        )
        self.dedup = Dedup(
            config.dedup.index or config.out / "dedup",
            threshold=config.dedup.threshold,
            num_perm=config.dedup.num_perm,
        )
        if config.dedup.decontaminate is not None:
            from dreamgen.store import read_records

            self.dedup.add_contaminants(
                [conversation_text(r) for r in read_records(config.dedup.decontaminate)]
            )
        self.planner = Planner(self.cards, config.plan, config.count)
        self.summary = Summary(target=config.count)
        self._restore()
        self.stop_event = asyncio.Event()
        self.pending: dict[str, tuple[Request, int]] = {}
        self.inflight = 0
        self.consecutive_errors = 0
        self.fatal: EngineError | None = None
        self.limit = config.concurrency

    def _restore(self) -> None:
        """Rebuild counts and dedup state from what the store already holds."""
        for record in self.store.records():
            self.planner.observe(record)
            text = conversation_text(record)
            if exact_key(text) not in self.dedup.exact:
                self.dedup.add(*self.dedup.signature(text))
        self.dedup.sync()
        self.summary.resumed = self.store.count
        totals = self.store.meta.get("totals", {})
        self.summary.rejected.update(totals.get("rejected", {}))

    @property
    def reached(self) -> bool:
        target = self.config.count
        return target is not None and self.store.count + len(self.pending) >= target

    def stop(self, reason: str = "signal") -> None:
        """Stop issuing requests; in-flight ones finish (see ``run``'s grace)."""
        self.summary.stopped_by = reason
        self.stop_event.set()

    async def run(self, grace_s: float = 30.0) -> Summary:
        """Generate until the target is reached or ``stop`` is called; returns the summary."""
        tasks: set[asyncio.Task[None]] = set()
        flusher = asyncio.create_task(self._flush_loop())
        try:
            async with open_engine(self.config) as (engine, limit):
                self.limit = limit
                self.engine = engine
                slots = asyncio.Semaphore(limit)
                while not (self.reached or self.stop_event.is_set() or self.fatal):
                    await slots.acquire()
                    while self.hold is not None and self.hold() and not self.stop_event.is_set():
                        await asyncio.sleep(0.05)
                    if self.reached or self.stop_event.is_set() or self.fatal:
                        slots.release()
                        break
                    task = asyncio.create_task(self._one(engine, self.planner.next()))
                    tasks.add(task)
                    task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
                    await asyncio.sleep(0)  # let finished tasks hand back slots
                if tasks:
                    # The target may be met by what is in flight; wait, then drop surplus.
                    done, _ = await asyncio.wait(tasks, timeout=grace_s)
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            self._flush()
            self.summary.finished = time.monotonic()
            self.summary.coverage = self.planner.coverage()
            self.store.close(**self._manifest_extra())
            self.dedup.close()
        if self.fatal is not None:
            raise self.fatal
        return self.summary

    def _manifest_extra(self) -> dict[str, Any]:
        s = self.summary
        old = self.store.meta.get("totals", {})
        return {
            "totals": {
                "records": self.store.count,
                "rejected": dict(sorted(s.rejected.items())),
                "requests": old.get("requests", 0) + s.requests,
                "prompt_tokens": old.get("prompt_tokens", 0) + s.prompt_tokens,
                "completion_tokens": old.get("completion_tokens", 0) + s.completion_tokens,
            },
            "coverage": self.planner.coverage(),
            "last_run": s.as_dict(),
        }

    async def _one(self, engine: Engine, request: Request) -> None:
        self.inflight += 1
        try:
            await self._process(engine, request)
        finally:
            self.inflight -= 1

    async def _process(self, engine: Engine, request: Request) -> None:
        s = self.summary
        s.requests += 1
        sampling = self.config.sampling.body(request.index)
        try:
            completion = await engine.chat(
                request.messages,
                response_format=response_format(request.schema_name),
                sampling=sampling,
            )
        except EngineError as exc:
            self._reject(request, "engine_error")
            self.consecutive_errors += 1
            log.warning("engine error: %s", exc)
            if self.consecutive_errors >= 8 and self.fatal is None:
                self.fatal = exc
            return
        except asyncio.CancelledError:
            self.planner.rejected(request)
            raise
        self.consecutive_errors = 0
        s.prompt_tokens += completion.prompt_tokens
        s.completion_tokens += completion.completion_tokens
        try:
            record = validate(
                completion.content,
                request,
                finish_reason=completion.finish_reason,
                model=engine.model,
                engine=engine.name,
                sampling=sampling,
            )
            filters.check(record)
            record.split = split_for(record.group_id, self.config.splits)
            key, mh = self.dedup.signature(conversation_text(record))
            reason = self.dedup.check(key, mh)
            if reason is not None:
                raise Rejected(reason, "seen before")
        except Rejected as rej:
            self._reject(request, rej.reason)
            return
        if self.reached:  # surplus beyond the target: not accepted, not a rejection
            self.planner.rejected(request)
            return
        self.dedup.add(key, mh)
        if self.store.add(record):
            self.pending[record.id] = (request, completion.completion_tokens)
            if len(self.pending) >= self.config.store.flush_records:
                self._flush()
        else:
            self._reject(request, "duplicate")

    def _reject(self, request: Request, reason: str) -> None:
        self.summary.rejected[reason] += 1
        self.planner.rejected(request)
        if self.on_progress:
            self.on_progress(self.summary)

    async def _flush_loop(self) -> None:
        last_manifest = time.monotonic()
        while True:
            await asyncio.sleep(self.config.store.flush_interval_s)
            rotations = self.store.rotations
            self._flush()
            now = time.monotonic()
            if self.store.rotations != rotations or now - last_manifest > 30:
                self.store.write_manifest(**self._manifest_extra())
                last_manifest = now

    def _flush(self) -> None:
        # Dedup first: a signature without its record only blocks a record nobody saw.
        self.dedup.sync()
        for record in self.store.flush():
            request, tokens = self.pending.pop(record.id)
            self.planner.accepted(request, record)
            self.summary.accepted += 1
            self.summary.accepted_tokens += tokens
            if self.on_record is not None:
                self.on_record(record)
        if self.on_progress:
            self.on_progress(self.summary)
