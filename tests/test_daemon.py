"""`dreamgen daemon` as a real subprocess: readiness, outages, metrics, SIGHUP, signals.

Most tests run it against the simulated vLLM server in its own process (fast); one runs
it on the embedded engine end to end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from fake_vllm import SimProcess
from prometheus_client.parser import text_string_to_metric_families

from dreamgen.audit import audit

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


class DaemonProc:
    """A `dreamgen daemon` subprocess with JSON logs in a file and its HTTP endpoints."""

    def __init__(self, tmp: Path, config: Path | None, out: Path, *args: str) -> None:
        self.port = free_port()
        self.out = out
        self.log_path = tmp / f"daemon-{self.port}.log"
        cmd = [sys.executable, "-m", "dreamgen", "daemon", "--out", str(out)]
        cmd += ["--port", str(self.port), "--log-json", *args]
        if config is not None:
            cmd += ["--config", str(config)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), float("nan"))

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_bytes().splitlines()
        return [orjson.loads(ln) for ln in lines if ln.startswith(b"{")]

    def event(self, name: str, n: int = 1) -> list[dict[str, Any]] | None:
        found = [e for e in self.events() if e.get("event") == name]
        return found if len(found) >= n else None

    def wait_ready(self, timeout: float) -> None:
        wait_for(lambda: self.get("/readyz")[0] == 200, timeout, "/readyz 200")

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextmanager
def daemon(tmp: Path, config: Path | None, out: Path, *args: str) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp, config, out, *args)
    try:
        yield d
    except BaseException:
        sys.stderr.write(d.log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        d.kill()


def shard_lines(out: Path) -> tuple[int, int]:
    """(records in closed and open shards, closed shard files)."""
    closed = sorted((out / "shards").glob("part-*.jsonl"))
    opened = sorted((out / "shards").glob("part-*.jsonl.open"))
    n = sum(len(p.read_bytes().splitlines()) for p in closed + opened)
    return n, len(closed)


def sim_config(tmp: Path, url: str, prompts: Path, **extra: str) -> Path:
    text = f"""
engine = "openai"
servers = ["{url}"]
model = "dreamgen-sim"
concurrency = 16
max_attempts = 2
prompts = "{prompts}"
[store]
shard_records = 40
[serving]
health_interval_s = 0.2
outage_backoff_max_s = 0.5
[daemon]
grace_s = 20
"""
    for key, value in extra.items():
        text = f"{key} = {value}\n" + text
    path = tmp / "daemon.toml"
    path.write_text(text)
    return path


def post(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(url, data=orjson.dumps(body), method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass


def test_daemon_outage_metrics_reload_and_drain(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    shutil.copytree(ROOT / "dreamgen" / "prompts", prompts)
    out = tmp_path / "out"
    with SimProcess("--profile", "8b", "--speedup", "20") as sim:
        config = sim_config(tmp_path, sim.url, prompts)
        with daemon(tmp_path, config, out) as d:
            wait_for(lambda: d.get("/healthz")[0] == 200, 30, "/healthz")
            d.wait_ready(30)
            wait_for(lambda: d.value("dreamgen_store_records") >= 100, 60, "100 records")

            # -- an outage: not ready, nothing in flight, and the metrics match the store
            post(sim.url + "/sim/outage", {"on": True})
            _status, body = wait_for(
                lambda: (r := d.get("/readyz"))[0] == 503 and r, 10, "/readyz 503"
            )
            assert "health answered HTTP 503" in body

            def settled() -> Any:
                # Nothing in flight and nothing accepted-but-not-yet-fsynced (flushes run
                # every 0.2 s): every request is a durable record or a named rejection.
                m = d.metrics()
                rej = sum(x for (n, _), x in m.items() if n == "dreamgen_records_rejected_total")
                done = m[("dreamgen_records_accepted_total", ())] + rej
                quiet = m[("dreamgen_requests_in_flight", ())] == 0
                return quiet and m[("dreamgen_requests_total", ())] == done and m

            m = wait_for(settled, 20, "in-flight requests settled")

            def v(name: str, **labels: str) -> float:
                return m[(name, tuple(sorted(labels.items())))]

            records, closed = shard_lines(out)
            assert records > 0 and closed >= 2
            assert v("dreamgen_store_records") == records
            assert v("dreamgen_records_accepted_total") == records  # a fresh OUT
            assert v("dreamgen_shard_rotations_total") == closed
            assert v("dreamgen_store_shards") == closed
            rejected = sum(
                val for (name, _), val in m.items() if name == "dreamgen_records_rejected_total"
            )
            assert v("dreamgen_requests_total") == records + rejected
            completed = v("dreamgen_request_latency_seconds_count")
            assert completed == v("dreamgen_requests_total") - v("dreamgen_engine_errors_total")
            assert v("dreamgen_ready") == 0 and v("dreamgen_concurrency_limit") == 0
            assert v("dreamgen_server_up", server=sim.url) == 0
            assert v("dreamgen_engine_outages_total") == 1
            assert v("dreamgen_tokens_total", kind="accepted") <= v(
                "dreamgen_tokens_total", kind="completion"
            )
            filled = sum(val for (n, _), val in m.items() if n == "dreamgen_coverage_filled")
            assert filled == records
            time.sleep(1.0)
            assert shard_lines(out)[0] == records  # quiet while the server is down
            assert d.proc.poll() is None

            # -- the server comes back: ready again, producing again
            post(sim.url + "/sim/outage", {"on": False})
            d.wait_ready(15)
            wait_for(lambda: d.value("dreamgen_store_records") > records + 20, 30, "resumed")
            assert d.event("not_ready") and d.event("server_up", 2)

            # -- SIGHUP with a good card set (one card fewer): applied
            cards = sorted(prompts.glob("*.yaml"))
            assert len(cards) >= 2
            cards[0].unlink()
            d.proc.send_signal(signal.SIGHUP)
            reload = wait_for(lambda: d.event("reload"), 10, "reload event")[0]
            assert reload["cards"] == len(cards) - 1
            assert d.value("dreamgen_reloads_total", result="ok") == 1

            # -- SIGHUP with a broken card: refused, the old cards stay, still producing
            (prompts / "broken.yaml").write_text("id: broken\ntitle: a: b\n")
            d.proc.send_signal(signal.SIGHUP)
            refused = wait_for(lambda: d.event("reload_refused"), 10, "refusal")[0]
            assert "broken.yaml" in refused["reason"]
            (prompts / "broken.yaml").unlink()
            # -- and a change that needs a restart: refused too
            config.write_text(config.read_text().replace("concurrency = 16", "concurrency = 8")
                              .replace('model = "dreamgen-sim"', 'model = "other"'))  # fmt: skip
            d.proc.send_signal(signal.SIGHUP)
            refused = wait_for(lambda: d.event("reload_refused", 2), 10, "refusal")[1]
            assert "model cannot change" in refused["reason"]
            assert d.value("dreamgen_reloads_total", result="refused") == 2
            now = d.value("dreamgen_store_records")
            wait_for(lambda: d.value("dreamgen_store_records") > now + 20, 30, "still producing")

            # -- SIGTERM: drain, close the shard and manifest, exit 0
            t0 = time.monotonic()
            assert d.stop() == 0
            assert time.monotonic() - t0 < 30  # grace is 20 s; answers take ~0.2 s
    assert d.event("drain") and d.event("stopped")
    records, _ = shard_lines(out)
    assert not list((out / "shards").glob("*.open"))
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["records"] == records
    check = subprocess.run(
        [sys.executable, "-m", "dreamgen", "validate", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
    assert f"{records} valid records, 0 problems" in check.stdout


def test_second_signal_stops_at_once_and_keeps_what_was_accepted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Slow answers (~2-3 s each) so the drain would take a while.
    with SimProcess("--profile", "8b", "--speedup", "1") as sim:
        config = sim_config(tmp_path, sim.url, ROOT / "dreamgen" / "prompts")
        config.write_text(config.read_text().replace("grace_s = 20", "grace_s = 120"))
        with daemon(tmp_path, config, out) as d:
            d.wait_ready(30)
            wait_for(lambda: d.value("dreamgen_store_records") >= 5, 60, "5 records")
            assert d.value("dreamgen_requests_in_flight") > 0
            seen = d.value("dreamgen_store_records")
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: d.event("drain"), 10, "drain")
            d.proc.send_signal(signal.SIGINT)
            code = d.proc.wait(timeout=30)
            took = time.monotonic() - t0
    assert code == 0 and took < 10, (code, took)
    assert d.event("stop_now") and d.event("stopped")
    valid, problems = audit(out)
    assert problems == [] and valid >= seen
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["records"] == valid == shard_lines(out)[0]


def test_missing_model_keeps_the_daemon_up_and_not_ready(tmp_path: Path) -> None:
    with SimProcess("--profile", "stress") as sim:
        config = sim_config(tmp_path, sim.url, ROOT / "dreamgen" / "prompts")
        config.write_text(config.read_text().replace('model = "dreamgen-sim"', 'model = "nope"'))
        with daemon(tmp_path, config, tmp_path / "out") as d:
            wait_for(lambda: d.get("/healthz")[0] == 200, 30, "/healthz")
            _status, body = wait_for(
                lambda: (r := d.get("/readyz"))[0] == 503 and "served" in r[1] and r,
                15,
                "/readyz names the model",
            )
            assert "'nope' is not served" in body and "it serves: dreamgen-sim" in body
            time.sleep(1.0)
            assert d.proc.poll() is None
            assert d.value("dreamgen_ready") == 0
            assert d.stop(timeout=15) == 0


def test_daemon_on_the_embedded_engine(tmp_path: Path) -> None:
    """Defaults (embedded engine, unbounded): ready, ≥1 record, SIGTERM drains, exit 0."""
    config = tmp_path / "embedded.toml"
    config.write_text("embedded_parallel = 2\n")  # fewer, faster answers on 2 cores
    out = tmp_path / "out"
    with daemon(tmp_path, config, out, "--grace", "5") as d:
        d.wait_ready(120)
        assert d.value("dreamgen_concurrency_limit") == 4
        wait_for(lambda: d.value("dreamgen_store_records") >= 1, 420, "a record", step=1.0)
        assert d.stop(timeout=120) == 0
    assert d.event("drain") and d.event("stopped")
    start = d.event("start")
    assert start is not None and start[0]["engine"] == "embedded" and start[0]["target"] is None
    valid, problems = audit(out)
    assert problems == [] and valid >= 1
    check = subprocess.run(
        [sys.executable, "-m", "dreamgen", "validate", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
    assert os.path.exists(out / "manifest.json")


def test_example_config_loads_and_documents_every_field() -> None:
    import re
    import tomllib

    from pydantic import BaseModel

    from dreamgen.config import Config, load_config

    path = ROOT / "dreamgen.example.toml"
    load_config(path)  # valid as shipped
    text = path.read_text()
    sections = {m.group(1): m.start() for m in re.finditer(r"^\[(\w+)\]$", text, re.M)}
    missing = []
    for name, field in Config.model_fields.items():
        if isinstance(field.default, BaseModel):
            start = sections.get(name)
            if start is None:
                missing.append(f"[{name}]")
                continue
            nxt = min([p for p in sections.values() if p > start] or [len(text)])
            body = text[start:nxt]
            for sub in type(field.default).model_fields:
                if not re.search(rf"^#? ?{sub} = ", body, re.M):
                    missing.append(f"{name}.{sub}")
        elif not re.search(rf"^#? ?{name} = ", text[: min(sections.values())], re.M):
            missing.append(name)
    assert missing == [], f"document these in dreamgen.example.toml: {missing}"
    assert tomllib.loads(text)  # and it is TOML
