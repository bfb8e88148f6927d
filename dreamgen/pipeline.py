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

from dreamgen import filters, pairs
from dreamgen.cards import CardSet
from dreamgen.config import Config
from dreamgen.dedup import Dedup, conversation_text, exact_key, load_heldout
from dreamgen.engines import (
    EMBEDDED_MODEL,
    Completion,
    EmbeddedServer,
    EngineError,
    api_key_from_env,
)
from dreamgen.planner import Planner, Request
from dreamgen.record import Record, split_for
from dreamgen.scenario import response_format
from dreamgen.store import Store
from dreamgen.validate import Rejected, validate
from dreamgen.vllm import Gate, wait_event

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
    minimal_pairs: int = 0  # derived variants written beside accepted records
    engine_errors: int = 0
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
            "minimal_pairs": self.minimal_pairs,
            "elapsed_s": round(el, 2),
            "accepted_per_s": round(self.accepted / el, 3),
            "accepted_tokens_per_s": round(self.accepted_tokens / el, 1),
            "completion_tokens_per_s": round(self.completion_tokens / el, 1),
            "stopped_by": self.stopped_by,
        }


@contextlib.asynccontextmanager
async def open_engine(
    config: Config,
    *,
    wait: bool = False,
    on_engine: Callable[[Any], None] | None = None,
) -> AsyncIterator[tuple[Engine, int]]:
    """Start the configured engine; yields it with its initial in-flight limit.

    Server engines (embedded, openai) carry a ``gate``: their live limit, which adapts to
    the server's load and drops to zero while no server is healthy. ``wait`` waits out a
    server that is down or still loading (the daemon) instead of failing with one clear
    line (a build). ``on_engine`` sees the engine before it is ready (for /readyz).
    """
    if config.engine == "vllm-offline":
        from dreamgen.offline import OfflineEngine

        offline = OfflineEngine(config)
        if on_engine is not None:
            on_engine(offline)
        await offline.start()
        try:
            yield offline, config.concurrency
        finally:
            await offline.close()
        return

    from dreamgen.vllm import AdaptSettings, Launcher, ServerEngine

    server: EmbeddedServer | None = None
    launcher: Launcher | None = None
    serving = config.serving
    try:
        if config.engine == "embedded":
            server = EmbeddedServer(parallel=config.embedded_parallel)
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
            timeout: float | None = 120.0
        else:
            if serving.launch:
                launcher = Launcher(
                    serving.launch,
                    log_path=serving.launch_log or config.out / "server.log",
                    stop_grace_s=serving.stop_grace_s,
                    backoff_s=serving.restart_backoff_s,
                    backoff_max_s=serving.restart_backoff_max_s,
                    max_failures=None if wait else 3,
                )
                await launcher.start()
            a = config.adapt
            engine = ServerEngine(
                config.servers,
                config.model_name,
                api_key=api_key_from_env(config.api_key_env),
                concurrency=config.concurrency,
                adaptive=config.adaptive,
                adapt=AdaptSettings(
                    min_limit=a.min_concurrency,
                    increase=a.increase,
                    decrease=a.decrease,
                    max_waiting=a.max_waiting,
                    max_kv_usage=a.max_kv_usage,
                    cooldown_s=a.cooldown_s,
                ),
                start_limit=a.start,
                timeout_s=config.request_timeout_s,
                max_attempts=config.max_attempts,
                health_interval_s=serving.health_interval_s,
                backoff_max_s=serving.outage_backoff_max_s,
                guided=serving.guided_decoding,
                launcher=launcher,
            )
            timeout = serving.launch_timeout_s if launcher and not wait else None
        if on_engine is not None:
            on_engine(engine)
        try:
            await engine.start(
                wait=wait or launcher is not None or server is not None, timeout_s=timeout
            )
        except BaseException:
            await engine.close()
            raise
        try:
            yield engine, engine.limit
        finally:
            await engine.close()
    finally:
        if launcher is not None:
            await launcher.stop()
        if server is not None:
            await asyncio.to_thread(server.stop)


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
        tolerate_outages: bool = False,
        on_completion: Callable[[Completion], Any] | None = None,
    ) -> None:
        self.config = config
        # A daemon waits out outages and failing servers; a build fails with one clear line.
        self.tolerate_outages = tolerate_outages
        self.on_completion = on_completion
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
            target=config.count,
        )
        self.dedup = Dedup(
            config.dedup.index or config.out / "dedup",
            threshold=config.dedup.threshold,
            num_perm=config.dedup.num_perm,
        )
        if config.dedup.decontaminate is not None:
            self.dedup.add_contaminants(load_heldout(config.dedup.decontaminate))
        self.planner = Planner(self.cards, config.plan, config.count)
        self.summary = Summary(target=config.count)
        self._restore()
        self.stop_event = asyncio.Event()
        self.pending: dict[str, tuple[Request, int]] = {}
        self.inflight = 0
        self.consecutive_errors = 0
        self.fatal: EngineError | None = None
        self.engine: Any = None
        self.gate: Gate | None = None
        self._fixed_limit = config.concurrency
        self._wakeup = asyncio.Event()  # stop or fatal: interrupts a wait for a slot
        self.outage_timeout_s = 120.0  # a build gives up on a server down this long

    @property
    def limit(self) -> int:
        """The in-flight limit now (it adapts for vLLM servers; 0 during an outage)."""
        return self.gate.limit if self.gate is not None else self._fixed_limit

    def _set_engine(self, engine: Any) -> None:
        self.engine = engine

    def _restore(self) -> None:
        """Rebuild counts and dedup state from what the store already holds."""
        self.pairs = 0  # minimal pairs in the store: they do not count toward the target
        for record in self.store.records():
            self.pairs += record.mode == "minimal_pair"
            self.planner.observe(record)
            text = conversation_text(record)
            if exact_key(text) not in self.dedup.exact:
                self.dedup.add(*self.dedup.signature(text))
        self.dedup.sync()
        self.summary.resumed = self.store.count - self.pairs  # scenarios, as the target
        # Earlier runs' totals; this run's counts are added to them, never to a manifest
        # this run already wrote (that would count them twice).
        self.base_totals: dict[str, Any] = dict(self.store.meta.get("totals", {}))
        self.summary.rejected.update(self.base_totals.get("rejected", {}))

    @property
    def reached(self) -> bool:
        target = self.config.count
        done = self.store.count - self.pairs + len(self.pending)
        return target is not None and done >= target

    def stop(self, reason: str = "signal") -> None:
        """Stop issuing requests; in-flight ones finish (see ``run``'s grace)."""
        self.summary.stopped_by = reason
        self.stop_event.set()
        self._wakeup.set()

    def _fail(self, exc: EngineError) -> None:
        if self.fatal is None:
            self.fatal = exc
        self._wakeup.set()

    def _done(self) -> bool:
        return self.reached or self.stop_event.is_set() or self.fatal is not None

    def reload(self, config: Config, cards: CardSet) -> None:
        """Apply a reloaded config and card set without dropping in-flight work.

        The caller checks that only reloadable fields changed. Raises ValueError (and
        changes nothing) if the new cards and plan admit no request.
        """
        planner = Planner(cards, config.plan, config.count)
        # Carry over what the planner learnt (counts, parents, RNG); not what the config made.
        derived = {"cards", "config", "target", "cells", "quota"}
        for key, value in vars(self.planner).items():
            if key not in derived:
                setattr(planner, key, value)
        self.planner, self.cards, self.config = planner, cards, config
        self.summary.target = config.count
        st = self.store
        st.shard_records, st.shard_age_s = config.store.shard_records, config.store.shard_age_s
        st.config = config.data_config()
        st.fingerprint = config.fingerprint(cards.fingerprint)
        self._fixed_limit = config.concurrency
        if hasattr(self.engine, "set_concurrency"):
            self.engine.set_concurrency(config.concurrency)
        if self.gate is not None:
            self.gate.notify()

    async def _acquire(self, gate: Gate) -> bool:
        """Wait for a slot; False if the run stops (or fails) first."""
        while not (self.stop_event.is_set() or self.fatal is not None):
            if gate.try_acquire():
                return True
            acquire = asyncio.create_task(gate.acquire())
            wakeup = asyncio.create_task(self._wakeup.wait())
            await asyncio.wait({acquire, wakeup}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            wakeup.cancel()
            if not acquire.done():
                acquire.cancel()
                await asyncio.gather(acquire, return_exceptions=True)
            if acquire.done() and not acquire.cancelled():
                if self.stop_event.is_set() or self.fatal is not None:
                    gate.release()
                    return False
                return True
            self._check_outage()
        return False

    def _check_outage(self) -> None:
        down_since = getattr(self.engine, "down_since", None)
        if self.tolerate_outages or down_since is None:
            return
        if time.monotonic() - down_since > self.outage_timeout_s:
            reason = self.engine.reason() if hasattr(self.engine, "reason") else "not ready"
            waited = f"{self.outage_timeout_s:g}s"
            self._fail(EngineError(f"the server has not been ready for {waited}: {reason}"))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on stop or failure."""
        await wait_event(self._wakeup, seconds)

    async def run(self, grace_s: float = 30.0) -> Summary:
        """Generate until the target is reached or ``stop`` is called; returns the summary."""
        tasks: set[asyncio.Task[None]] = set()
        flusher = asyncio.create_task(self._flush_loop())
        try:
            async with open_engine(
                self.config, wait=self.tolerate_outages, on_engine=self._set_engine
            ) as (engine, limit):
                self.engine = engine
                self._fixed_limit = limit
                gate = getattr(engine, "gate", None)
                if not isinstance(gate, Gate):
                    gate = Gate(lambda: self._fixed_limit)
                self.gate = gate
                try:
                    await self._issue(engine, gate, tasks)
                    if tasks:
                        # The target may be met by what is in flight; wait, then drop surplus.
                        await asyncio.wait(tasks, timeout=grace_s)
                finally:
                    # Also on cancellation (a second signal): nothing runs on a closed store.
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

    async def _issue(self, engine: Engine, gate: Gate, tasks: set[asyncio.Task[None]]) -> None:
        """Issue requests while the window has room, until the target, a stop or a failure."""
        backoff_logged = False
        while not self._done():
            if self.tolerate_outages and self.consecutive_errors >= 8:
                # The server answers but every request fails: back off instead of hammering.
                delay = min(30.0, 0.5 * 2 ** min(self.consecutive_errors - 8, 6))
                if not backoff_logged:
                    log.warning("%d engine errors in a row: backing off", self.consecutive_errors)
                    backoff_logged = True
                await self._pause(delay)
                if self._done():
                    break
            else:
                backoff_logged = False
            if not await self._acquire(gate):
                break
            while self.hold is not None and self.hold() and not self.stop_event.is_set():
                await asyncio.sleep(0.05)
            if self._done():
                gate.release()
                break
            task = asyncio.create_task(self._one(engine, self.planner.next()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: gate.release())
            await asyncio.sleep(0)  # let finished tasks hand back slots

    def _manifest_extra(self) -> dict[str, Any]:
        s = self.summary
        old = self.base_totals
        return {
            "totals": {
                "records": self.store.count,
                "rejected": dict(sorted(s.rejected.items())),
                "requests": old.get("requests", 0) + s.requests,
                "prompt_tokens": old.get("prompt_tokens", 0) + s.prompt_tokens,
                "completion_tokens": old.get("completion_tokens", 0) + s.completion_tokens,
                "accepted_tokens": old.get("accepted_tokens", 0) + s.accepted_tokens,
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
            s.engine_errors += 1
            if getattr(engine, "ready", True):
                self.consecutive_errors += 1  # during an outage the engine's own state rules
                log.warning("engine error: %s", exc)
            else:  # the outage itself is logged once, by the engine
                log.debug("engine error during an outage: %s", exc)
            if self.consecutive_errors >= 8 and not self.tolerate_outages:
                self._fail(exc)
            return
        except asyncio.CancelledError:
            self.planner.rejected(request)
            raise
        self.consecutive_errors = 0
        if self.on_completion is not None:
            self.on_completion(completion)
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
            reason = self.dedup.check(key, mh, record)
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
        plan = self.config.plan
        while done := self.store.flush():
            for record in done:
                entry = self.pending.pop(record.id, None)
                if entry is None:  # a minimal pair of a record accepted just before
                    self.pairs += 1
                    self.summary.minimal_pairs += 1
                else:
                    request, tokens = entry
                    self.planner.accepted(request, record)
                    self.summary.accepted += 1
                    self.summary.accepted_tokens += tokens
                    if pairs.selected(record, plan.minimal_pairs):
                        for pair in pairs.derive(record, plan.minimal_pair_kinds):
                            self.store.add(pair)
                if self.on_record is not None:
                    self.on_record(record)
        if self.on_progress:
            self.on_progress(self.summary)
