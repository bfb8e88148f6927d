"""The generation loop: plan → engine → validate & label → filter & dedup → store.

One code path for `dreamgen build`, the daemon and library callers. A bounded window of
requests is in flight (never a whole plan gathered at once); accepted records are
reported only after the store has fsynced them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from dreamgen.breaker import YieldBreaker, YieldError
from dreamgen.cards import CardSet
from dreamgen.config import Config, ConfigError
from dreamgen.copies import CopyIndex
from dreamgen.dedup import Dedup, conversation_text, exact_key, load_heldout
from dreamgen.diskio import disk_error
from dreamgen.engines import Completion, Engine, EngineError, Gate, open_engine, wait_event
from dreamgen.fingerprint import prompt_fingerprint
from dreamgen.judge import Judge
from dreamgen.judge import Reason as JudgeReason
from dreamgen.judge_setup import open_judge
from dreamgen.judge_setup import resolve as resolve_judge
from dreamgen.planner import Planner
from dreamgen.record import Record
from dreamgen.rejects import RejectSample
from dreamgen.request import Request
from dreamgen.scenario import response_format
from dreamgen.stages import JUDGE_BEFORE, Chain, Item, Outcome, RunReason, StoreReason, chain_for
from dreamgen.store import Store, StoreError
from dreamgen.summary import Summary
from dreamgen.timeseries import TimeSeries

log = logging.getLogger("dreamgen.pipeline")


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
        repair: bool = False,
    ) -> None:
        config = resolve_judge(config)  # before the store: a refused judge touches nothing
        self.config = config
        self.judge: Judge | None = None  # set while running, when the judge is on
        self.judge_errors = 0  # judge calls failing in a row
        # A daemon waits out outages and failing servers; a build fails with one clear line.
        self.tolerate_outages = tolerate_outages
        self.on_completion = on_completion
        self.on_record = on_record
        self.on_progress = on_progress
        self.hold = hold  # backpressure: while it returns True, no new requests are issued
        self.cards = CardSet.load(config.prompts, config.extra_cards)
        try:  # before the store: a plan that admits no request must not touch OUT
            self.planner = Planner(self.cards, config.plan, config.count)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.store = Store(
            config.out,
            config=config.data_config(),
            fingerprint=config.fingerprint(prompt_fingerprint(self.cards)),
            shard_records=config.store.shard_records,
            shard_age_s=config.store.shard_age_s,
            force=force,
            target=config.count,
            repair=repair,
        )
        self.rejects = RejectSample(config.out)  # a sample to look at; never training data
        self.timeseries = TimeSeries(config.out)
        self.dedup = Dedup(
            config.dedup.index or config.out / "dedup",
            threshold=config.dedup.threshold,
            num_perm=config.dedup.num_perm,
        )
        if config.dedup.decontaminate is not None:
            self.dedup.add_contaminants(load_heldout(config.dedup.decontaminate))
        self.chain = self._chain(config)
        self.summary = Summary(target=config.count)
        self._restore()
        self.stop_event = asyncio.Event()
        self.pending: dict[str, tuple[Request, int]] = {}
        self.inflight = 0
        self.consecutive_errors = 0
        self.fatal: Exception | None = None
        # Daemon: why the store refuses writes (a full disk); no requests are issued
        # and the flusher retries with backoff until a real append works again.
        self.store_blocked: str | None = None
        self._store_failures = 0
        self.engine: Engine | None = None
        self.gate: Gate | None = None
        self._fixed_limit = config.concurrency
        self._wakeup = asyncio.Event()  # stop or fatal: interrupts a wait for a slot
        self.outage_timeout_s = 120.0  # a build gives up on a server down this long
        # Every answer rejected: a build stops; a daemon is not ready until breaker_until.
        self.breaker = YieldBreaker(config.breaker)
        self.breaker_open: str | None = None
        self.breaker_until = 0.0

    @property
    def limit(self) -> int:
        """The in-flight limit now (it adapts for vLLM servers; 0 during an outage)."""
        return self.gate.limit if self.gate is not None else self._fixed_limit

    def _set_engine(self, engine: Engine) -> None:
        self.engine = engine

    def _restore(self) -> None:
        """Rebuild counts and dedup state from what the store already holds."""
        self.pairs = 0  # minimal pairs in the store: they do not count toward the target
        for record in self.store.records():
            self.pairs += record.mode == "minimal_pair"
            self.planner.observe(record)
            text = conversation_text(record)
            if not self.dedup.contains(exact_key(text)):
                self.dedup.add(*self.dedup.signature(text))
        self.dedup.sync()
        self.summary.resumed = self.store.count - self.pairs  # scenarios, as the target
        # Earlier runs' totals; this run's counts are added to them, never to a manifest
        # this run already wrote (that would count them twice).
        self.base_totals: dict[str, Any] = dict(self.store.meta.get("totals", {}))
        self.summary.rejected.update(self.base_totals.get("rejected", {}))

    def _chain(self, config: Config) -> Chain:
        return chain_for(
            splits=config.splits,
            index=self.dedup,
            store=self.store,
            full=self._no_room,
            copy_index=CopyIndex(self.cards, config.copies),
            pair_share=config.plan.minimal_pairs,
            pair_kinds=config.plan.minimal_pair_kinds,
        )

    @property
    def reached(self) -> bool:
        target = self.config.count
        done = self.store.count - self.pairs + len(self.pending)
        return target is not None and done >= target

    def _no_room(self, record: Record) -> bool:
        """The target is met, or the share of it for ``record``'s mode is (an over-asked
        record of the other mode landed first)."""
        if self.reached:
            return True
        pending = [request.mode for request, _ in self.pending.values()]
        return not self.planner.has_room(record, pending)

    def stop(self, reason: str = "signal") -> None:
        """Stop issuing requests; in-flight ones finish (see ``run``'s grace)."""
        self.summary.stopped_by = reason
        self.stop_event.set()
        self._wakeup.set()

    def _fail(self, exc: Exception) -> None:
        if self.fatal is None:
            self.fatal = exc
        self._wakeup.set()

    def _stopped(self) -> bool:
        return self.stop_event.is_set() or self.fatal is not None

    def _done(self) -> bool:
        return self.reached or self._stopped()

    def reload(self, config: Config, cards: CardSet) -> None:
        """Apply a reloaded config and card set without dropping in-flight work.

        The caller checks that only reloadable fields changed. Raises ValueError (and
        changes nothing) if the new cards and plan admit no request.
        """
        config = config.model_copy(update={"judge": self.config.judge})  # not reloadable
        planner = Planner(cards, config.plan, config.count)
        # Carry over what the planner learnt (counts, parents, RNG); not what the config made.
        derived = {"cards", "config", "target", "cells", "quota"}
        for key, value in vars(self.planner).items():
            if key not in derived:
                setattr(planner, key, value)
        self.planner, self.cards, self.config = planner, cards, config
        self.chain = self._chain(config)
        self.summary.target = config.count
        st = self.store
        st.shard_records, st.shard_age_s = config.store.shard_records, config.store.shard_age_s
        st.config = config.data_config()
        st.fingerprint = config.fingerprint(prompt_fingerprint(cards))
        self._fixed_limit = config.concurrency
        if self.engine is not None:
            self.engine.set_concurrency(config.concurrency)
        if self.gate is not None:
            self.gate.notify()

    def _check_outage(self) -> None:
        engine = self.engine
        if self.tolerate_outages or engine is None or engine.down_since is None:
            return
        if time.monotonic() - engine.down_since > self.outage_timeout_s:
            reason = engine.reason()
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
            async with (
                open_engine(
                    self.config, wait=self.tolerate_outages, on_engine=self._set_engine
                ) as (engine, limit),
                open_judge(self.config, engine, wait=self.tolerate_outages) as judge,
            ):
                self.engine, self.judge = engine, judge
                self._fixed_limit = limit
                gate = engine.gate if engine.gate is not None else Gate(lambda: self._fixed_limit)
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
            try:
                self.rejects.flush(force=True)
                self.timeseries.maybe_append(self.summary.as_dict(), force=True)
            except OSError as exc:  # a full disk: side files only; the store decides below
                log.info("cannot write the run's side files: %s", exc)
            try:
                self.store.close(**self._manifest_extra())
            except StoreError as exc:  # a full disk at the end: what was reported is durable
                self._store_failed(exc, final=True)
            finally:
                try:
                    self.dedup.close()
                except OSError as exc:
                    self._store_failed(exc, final=True)
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
            if self.store_blocked is not None:  # daemon: the disk is full; wait it out
                await self._pause(1.0)
                continue
            if self.breaker_open is not None:  # daemon: nothing was kept; wait, then retry
                if (left := self.breaker_until - time.monotonic()) > 0:
                    await self._pause(min(left, 1.0))
                    continue
                log.warning("yield breaker: pause over, trying again")
                self.breaker_open = None
            if not await gate.acquire_unless(self._stopped, self._wakeup, self._check_outage):
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
        return {
            "totals": {"records": self.store.count, **s.totals(self.base_totals)},
            "coverage": self.planner.coverage(),
            "rejected_sample": self.rejects.counts(),
            "last_run": s.as_dict(),
        }

    async def _one(self, engine: Engine, request: Request) -> None:
        self.inflight += 1
        try:
            await self._process(engine, request)
        except OSError as exc:  # a stage's own file (the dedup index) on a full disk
            self._store_failed(exc)
        except Exception as exc:  # a bug: stop the run once, not a traceback per request
            if self.fatal is None:
                log.exception("internal error while processing a request: %s", exc)
            self._fail(exc)
        finally:
            self.inflight -= 1

    async def _process(self, engine: Engine, request: Request) -> None:
        s = self.summary
        s.requests += 1
        sampling = self.config.sampling.body(request.index)
        try:
            completion = await engine.chat(
                request.messages,
                response_format=response_format(request.schema_name, engine.schema_dialect),
                sampling=sampling,
            )
        except EngineError as exc:
            self._reject(request, RunReason.engine_error, message=str(exc))
            s.engine_errors += 1
            if engine.ready:
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
        item = Item.answered(request, completion, engine, sampling)
        try:
            outcome = await self._chain_process(item)
        except asyncio.CancelledError:  # a second signal while the judge was asked
            self.planner.rejected(request)
            raise
        if outcome.reason is StoreReason.surplus:  # beyond the target: not a rejection
            self.planner.rejected(request)
            return
        self._observe_yield(None if outcome.reason is None else str(outcome.reason))
        if outcome.reason is not None:
            self._reject(request, outcome.reason, item.content, outcome.message, item.finish_reason)
            return
        assert item.record is not None
        self.pending[item.record.id] = (request, completion.completion_tokens)
        if len(self.pending) >= self.config.store.flush_records:
            self._flush()

    def _observe_yield(self, reason: str | None) -> None:
        """Feed the yield breaker one finished answer; act when it opens."""
        why = self.breaker.observe(reason)
        if why is None:
            return
        if not self.tolerate_outages:
            self._fail(
                YieldError(
                    f"stopped: {why}; {self.store.count} records are durable in "
                    f"{self.config.out} (settings: [breaker] in the config)"
                )
            )
            return
        pause = self.breaker.pause_s()
        self.breaker_open = why
        self.breaker_until = time.monotonic() + pause
        log.error("yield breaker open, pausing %gs: %s", pause, why)

    async def _chain_process(self, item: Item) -> Outcome:
        """The stage chain, with the judge awaited between its two parts when it is on."""
        judge = self.judge
        if judge is None:
            return self.chain.process(item)
        outcome = self.chain.process(item, stop=JUDGE_BEFORE)
        if outcome.reason is not None:
            return outcome
        assert item.record is not None
        verdict = await judge.judge(item.record)
        self.summary.add_judge(verdict.completions)
        if verdict.reason is JudgeReason.judge_error:
            self.judge_errors += 1
            log.warning("judge error: %s", verdict.message)
            if self.judge_errors >= 8 and not self.tolerate_outages:
                self._fail(EngineError(f"judge: {verdict.message}"))
        else:
            self.judge_errors = 0
        if verdict.quality is not None:
            item.record.quality = verdict.quality
        if verdict.reason is not None:
            return Outcome(verdict.reason, verdict.message)
        return self.chain.process(item, start=JUDGE_BEFORE)

    def _reject(
        self,
        request: Request,
        reason: StrEnum,
        raw: str | None = None,
        message: str = "",
        finish_reason: str = "",
    ) -> None:
        self.summary.rejected[str(reason)] += 1
        if raw is not None:  # an engine error has no answer to keep
            self.rejects.add(
                str(reason), request, raw, message=message, finish_reason=finish_reason
            )
        self.planner.rejected(request)
        if self.on_progress:
            self.on_progress(self.summary)

    async def _flush_loop(self) -> None:
        last_manifest = time.monotonic()
        backoff = 1.0
        while True:
            await asyncio.sleep(self.config.store.flush_interval_s)
            if self.store_blocked is not None:
                await self._pause(backoff)
                backoff = min(30.0, backoff * 2)
                if not self.store.probe():  # a real append: a flush of nothing proves nothing
                    failures = self._store_failures
                    self._flush()
                    if self._store_failures == failures:
                        self.store_blocked = None
                        log.warning("the store is writable again: resuming")
                        backoff = 1.0
                continue
            rotations = self.store.rotations
            self._flush()
            try:
                self.rejects.flush()
                self.timeseries.maybe_append(self.summary.as_dict())
            except OSError as exc:  # side files: the store's own writes decide what stops
                log.info("cannot write the run's side files: %s", exc)
            now = time.monotonic()
            if self.store.rotations != rotations or now - last_manifest > 30:
                try:
                    self.store.write_manifest(**self._manifest_extra())
                except StoreError as exc:
                    self._store_failed(exc)
                last_manifest = now

    def _flush(self) -> None:
        try:
            self._flush_store()
        except (StoreError, OSError) as exc:  # a full disk; OSError: the dedup log's
            self._store_failed(exc)

    def _store_failed(self, exc: Exception, final: bool = False) -> None:
        """The disk refused a write: a build stops (one line); a daemon pauses and retries."""
        err = disk_error("writing the dedup index", exc) if isinstance(exc, OSError) else exc
        self._store_failures += 1
        if self.tolerate_outages and not final:
            if self.store_blocked is None:
                log.error("store not writable, pausing until it is: %s", err)
            self.store_blocked = str(err)
            return
        self._fail(
            StoreError(
                f"{err}; {self.store.count} records are durable in {self.config.out}; "
                "free space (or fix the disk) and run again to resume"
            )
        )

    def _flush_store(self) -> None:
        # Dedup first: a signature without its record only blocks a record nobody saw.
        self.dedup.sync()
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
                if self.on_record is not None:
                    self.on_record(record)
        if self.on_progress:
            self.on_progress(self.summary)
