"""``dreamgen daemon``: keep shards flowing for days, next to a vLLM server.

One ``Run`` (the same pipeline as ``dreamgen build``) in outage-tolerant mode, plus:

- signals: SIGTERM/SIGINT stop issuing requests, let in-flight ones finish within
  ``daemon.grace_s``, write what was accepted, close the shard and the manifest, exit 0;
  a second signal stops at once (what was accepted is already durable: the store
  reports a record only after fsync). SIGHUP reloads the seed cards and the reloadable
  config fields (``RELOADABLE``); a bad reload is refused and logged, the old one stays;
- ``/healthz``, ``/readyz``, ``/metrics`` on 127.0.0.1 (``dreamgen.metrics``);
- outages: a down server, a missing model or a dying launched server leave the daemon
  up and not ready; it probes with backoff and resumes by itself;
- logs: text, or JSON lines (``daemon.log_format = "json"``), one line per notable event
  (start, ready, outage, recovery, reload, shard closed, drain, stop) plus a status line
  a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import tomllib
from pathlib import Path
from typing import Any

from dreamgen.cards import CardError, CardSet
from dreamgen.config import Config, ConfigError, load_config
from dreamgen.diskio import probe_write
from dreamgen.engines import EngineError
from dreamgen.logs import event, setup_logging
from dreamgen.metrics import Metrics, MetricsServer
from dreamgen.pipeline import Run
from dreamgen.store import StoreError

log = logging.getLogger("dreamgen.daemon")

# Fields a SIGHUP may change; any other change needs a restart (and is refused).
RELOADABLE = {
    "count", "concurrency", "sampling", "plan", "prompts", "extra_cards", "store",
    "daemon.log_level",
}  # fmt: skip
STATUS_EVERY_S = 60.0
STORE_CHECK_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def fixed_changes(old: Config, new: Config) -> list[str]:
    """The fields that differ between ``old`` and ``new`` and cannot change on reload."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    changed: list[str] = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and key in ("daemon",):
            for sub in sorted(set(a[key]) | set(b[key])):
                if f"{key}.{sub}" not in RELOADABLE and a[key].get(sub) != b[key].get(sub):
                    changed.append(f"{key}.{sub}")
        elif key not in RELOADABLE and a.get(key) != b.get(key):
            changed.append(key)
    return changed


class Daemon:
    """The long-running generator; ``asyncio.run(Daemon(...).main())`` returns the exit code."""

    def __init__(
        self,
        config_path: Path | None = None,
        *,
        overrides: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        self.config_path = config_path
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.force = force
        self.config = self.load()
        self.metrics = Metrics()
        self.metrics.ready = self.readiness
        self.run: Run | None = None
        self.run_task: asyncio.Task[Any] | None = None
        self.server: MetricsServer | None = None
        self.draining = False
        self.signals = 0
        self.store_ok: tuple[bool, str] = (True, "")
        self._store_checked = 0.0
        self._was_ready: bool | None = None

    def load(self) -> Config:
        """Read the config file (or defaults) with the command-line overrides.

        A daemon's target is unbounded unless the file (or ``--count``) sets one.
        """
        cfg = load_config(self.config_path, **self.overrides)
        if "count" not in self.overrides and not _file_sets(self.config_path, "count"):
            cfg = cfg.model_copy(update={"count": None})
        return cfg

    # -- readiness -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        run = self.run
        if run is None:
            return False, "starting"
        engine = run.engine
        if engine is None:
            return False, "starting the engine"
        if not engine.ready:
            return False, engine.reason() or "engine not ready"
        if run.gate is None:
            return False, "starting the engine"
        if run.breaker_open is not None:
            return False, f"yield breaker open (retrying later): {run.breaker_open}"
        ok, why = self.check_store()
        if not ok:
            return False, why
        return True, ""

    def check_store(self, force: bool = False) -> tuple[bool, str]:
        """Is the output folder writable? (A real append, at most every few seconds.)

        Creating an empty file works on a full disk, so the probe writes and fsyncs
        bytes; and while the run's own writes fail, that failure is the answer.
        """
        run = self.run
        if run is not None and run.store_blocked is not None:
            return False, f"store not writable: {run.store_blocked}"
        now = time.monotonic()
        if not force and now - self._store_checked < STORE_CHECK_EVERY_S:
            return self.store_ok
        self._store_checked = now
        why = run.store.probe() if run is not None else probe_write(self.config.out)
        self.store_ok = (not why, why)
        return self.store_ok

    # -- main ----------------------------------------------------------------------------

    async def main(self) -> int:
        cfg = self.config
        self.server = MetricsServer(self.metrics, cfg.daemon.host, cfg.daemon.port)
        try:
            await self.server.start()
        except OSError as exc:
            event(log, logging.ERROR, "error", "cannot listen on %s:%s: %s", cfg.daemon.host,
                  cfg.daemon.port, exc.strerror or exc)  # fmt: skip
            return 2
        event(log,
            logging.INFO, "start", "dreamgen daemon pid %d: out %s, engine %s, http://%s:%d",
            os.getpid(), cfg.out, cfg.engine, cfg.daemon.host, self.server.port,
            pid=os.getpid(), out=str(cfg.out), engine=cfg.engine, port=self.server.port,
            target=cfg.count,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            return await self._serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.server.stop()

    async def _serve(self) -> int:
        cfg = self.config
        try:
            self.run = await asyncio.to_thread(
                Run, cfg, force=self.force, tolerate_outages=True,
                on_completion=self.metrics.observe,
            )  # fmt: skip
        except (CardError, StoreError, ConfigError, ValueError) as exc:
            event(log, logging.ERROR, "error", "cannot start: %s", exc, error=str(exc))
            return 2
        self.metrics.attach(self.run)
        if self.run.summary.resumed:
            event(log, logging.INFO, "resume", "resuming with %d records", self.run.summary.resumed,
                  records=self.run.summary.resumed)  # fmt: skip
        if self.signals:  # a signal came while the store was opening: nothing to drain
            self.run.store.close(**self.run._manifest_extra())
            self.run.dedup.close()
            event(log, logging.INFO, "stopped", "stopped before starting the engine")
            return 0
        self.run_task = asyncio.create_task(self.run.run(grace_s=cfg.daemon.grace_s))
        watcher = asyncio.create_task(self._watch())
        code = 0
        try:
            summary = await self.run_task
            if summary.stopped_by == "target":
                event(log, logging.INFO, "target_reached", "target of %s records reached",
                      cfg.count, records=self.run.store.count)  # fmt: skip
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or not self.signals:
                raise  # cancelled from outside, not by a signal
            self.run.summary.stopped_by = "signal"
        except EngineError as exc:  # a non-server engine that cannot start (vllm missing)
            event(log, logging.ERROR, "error", "engine failed: %s", exc, error=str(exc))
            code = 2
        except StoreError as exc:  # stopped while the disk refused the last writes
            event(log, logging.ERROR, "error", "store failed: %s", exc, error=str(exc))
            code = 2
        except Exception as exc:  # a bug: the store is closed (Run.run's finally); say so
            log.exception("crashed: %s", exc, extra={"event": "crash", "fields": {}})
            code = 1
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        s = self.run.summary
        event(log,
            logging.INFO, "stopped", "stopped: %d records in %s (%d accepted now, %d requests)",
            self.run.store.count, cfg.out, s.accepted, s.requests,
            records=self.run.store.count, accepted=s.accepted, requests=s.requests,
            rejected=sum(s.rejected.values()), stopped_by=s.stopped_by,
        )  # fmt: skip
        return code

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        name = signal.Signals(sig).name
        run = self.run
        if self.signals == 1:
            self.draining = True
            if run is not None and run.gate is not None:
                event(log,
                    logging.WARNING, "drain",
                    "%s: draining %d in-flight requests (grace %.0fs); signal again to stop now",
                    name, run.inflight, self.config.daemon.grace_s,
                    signal=name, inflight=run.inflight, grace_s=self.config.daemon.grace_s,
                )  # fmt: skip
                run.stop("signal")
                return
            # Nothing in flight yet (the engine is starting or waiting for a server).
            event(log, logging.WARNING, "stop", "%s while starting: stopping", name, signal=name)
            if run is not None:
                run.stop("signal")
            if self.run_task is not None:
                self.run_task.cancel()
            return
        event(log, logging.WARNING, "stop_now", "%s again: stopping now", name, signal=name)
        if run is not None and run.engine is not None:
            launcher = run.engine.launcher
            if launcher is not None:
                launcher.stop_grace_s = min(launcher.stop_grace_s, 2.0)
        if self.run_task is not None:
            self.run_task.cancel()

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: apply a new config and card set, or refuse and keep the old ones."""
        if self.run is None or self.draining:
            event(log, logging.WARNING, "reload_refused", "reload refused: not running yet",
                  reason="not running")  # fmt: skip
            self.metrics.reloads.labels("refused").inc()
            return False
        try:
            new = self.load()
            fixed = fixed_changes(self.config, new)
            if fixed:
                raise ConfigError(
                    f"{', '.join(fixed)} cannot change while running (restart the daemon)"
                )
            cards = CardSet.load(new.prompts, new.extra_cards)
            self.run.reload(new, cards)
        except (ConfigError, CardError, ValueError, OSError) as exc:
            reason = str(exc).replace("\n", "; ")
            event(log, logging.ERROR, "reload_refused",
                  "reload refused, keeping the old config: %s", reason, reason=reason)  # fmt: skip
            self.metrics.reloads.labels("refused").inc()
            return False
        changed = [
            k for k in sorted(RELOADABLE)
            if _get(self.config, k) != _get(new, k)
        ]  # fmt: skip
        self.config = new
        logging.getLogger("dreamgen").setLevel(new.daemon.log_level.upper())
        event(log,
            logging.INFO, "reload", "reloaded: %d cards (%s); changed: %s",
            len(cards.cards), cards.fingerprint, ", ".join(changed) or "nothing",
            cards=len(cards.cards), cards_fingerprint=cards.fingerprint, changed=changed,
        )  # fmt: skip
        self.metrics.reloads.labels("ok").inc()
        return True

    # -- watching ------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Log shard closes, readiness changes and a status line a minute."""
        assert self.run is not None
        run = self.run
        rotations = run.store.rotations
        last_status = time.monotonic()
        last_accepted = run.summary.accepted
        while True:
            await asyncio.sleep(0.5)
            if run.store.rotations != rotations:
                new = run.store.rotations - rotations
                rotations = run.store.rotations
                for shard in run.store.closed[-new:]:
                    event(log, logging.INFO, "shard_closed", "closed shard %s (%d records)",
                          shard.name, shard.records, shard=shard.name,
                          records=shard.records)  # fmt: skip
            self.check_store()
            ready, reason = self.readiness()
            if ready != self._was_ready and not self.draining:
                if ready:
                    event(log, logging.INFO, "ready", "ready: limit %d", run.limit, limit=run.limit)
                elif self._was_ready is not None:
                    event(log, logging.WARNING, "not_ready", "not ready: %s", reason, reason=reason)
                self._was_ready = ready
            now = time.monotonic()
            if now - last_status >= STATUS_EVERY_S:
                s = run.summary
                rate = (s.accepted - last_accepted) / (now - last_status)
                event(log,
                    logging.INFO, "status",
                    "%d records, %.2f/s, in flight %d/%d, %d rejected, %d engine errors",
                    run.store.count, rate, run.inflight, run.limit, sum(s.rejected.values()),
                    s.engine_errors, records=run.store.count, accepted_per_s=round(rate, 3),
                    inflight=run.inflight, limit=run.limit, ready=ready,
                    engine_errors=s.engine_errors,
                )  # fmt: skip
                last_status, last_accepted = now, s.accepted


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _file_sets(path: Path | None, key: str) -> bool:
    if path is None:
        return False
    try:
        return key in tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False  # load_config has already reported it


def run_daemon(
    config_path: Path | None = None,
    *,
    out: Path | None = None,
    port: int | None = None,
    grace_s: float | None = None,
    count: int | None = None,
    log_format: str | None = None,
    force: bool = False,
) -> int:
    """Entry point of ``dreamgen daemon``; returns the exit code.

    Raises ConfigError for a bad config file (the CLI prints it as one line).
    """
    overrides = {
        "out": out,
        "count": count,
        "daemon.port": port,
        "daemon.grace_s": grace_s,
        "daemon.log_format": log_format,
    }
    daemon = Daemon(config_path, overrides=overrides, force=force)
    d = daemon.config.daemon
    setup_logging(d.log_format, d.log_level, d.log_file)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(daemon.main())
    return 0
