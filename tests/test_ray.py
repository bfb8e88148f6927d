"""The Ray executor on a real local Ray cluster (started by this module, on 127.0.0.1).

Builds run as `dreamgen build --executor ray` subprocesses against the simulated vLLM
server (the GPU server's stand-in) and, once, the embedded engine; a worker actor is
killed mid-run with ``ray.kill``, and the driver is SIGKILLed mid-run and resumed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_vllm import SimProcess

from dreamgen.audit import audit
from dreamgen.reader import read

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ray start --head` on loopback with a small object store; `ray stop` after."""
    ray_bin = Path(sys.executable).parent / "ray"
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=4", "--object-store-memory=100000000", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        check=True, capture_output=True, timeout=180, env=env,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _build(out: Path, address: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dreamgen", "build", "--executor", "ray", "--ray-address",
        address, "--out", str(out), "--quiet", "--seed", "3", *extra,
    ]  # fmt: skip


def _clean(out: Path, count: int) -> None:
    assert audit(out) == (count, [])
    ids = [r.id for r in read(out)]
    assert len(ids) == count and len(set(ids)) == count


def test_two_workers_reach_the_target_against_the_simulated_server(
    cluster: str, tmp_path: Path
) -> None:
    with SimProcess("--profile", "8b", "--speedup", "50") as sim:
        out = tmp_path / "out"
        cmd = _build(out, cluster, "--server", sim.url, "--server", sim.url, "--model",
                     sim.model, "--workers", "2", "--count", "40")  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
    _clean(out, 40)


def test_a_killed_worker_is_replaced_and_the_store_is_complete(
    cluster: str, tmp_path: Path
) -> None:
    with SimProcess("--profile", "8b", "--speedup", "5") as sim:
        out = tmp_path / "out"
        cmd = _build(out, cluster, "--server", sim.url, "--model", sim.model,
                     "--workers", "2", "--count", "30")  # fmt: skip
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        ray.init(address=cluster, namespace="dreamgen", log_to_driver=False)
        try:
            deadline = time.monotonic() + 120
            victim = None
            while victim is None and time.monotonic() < deadline:
                try:
                    victim = ray.get_actor("dreamgen-worker-0", namespace="dreamgen")
                except ValueError:
                    time.sleep(0.5)
            assert victim is not None, "the worker never started"
            time.sleep(3)  # let it take requests
            ray.kill(victim)
        finally:
            ray.shutdown()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "Ray worker 0 died; starting a replacement" in err
    _clean(out, 30)


def test_a_sigkilled_driver_resumes_to_a_complete_clean_store(cluster: str, tmp_path: Path) -> None:
    with SimProcess("--profile", "8b", "--speedup", "5") as sim:
        out = tmp_path / "out"
        cmd = _build(out, cluster, "--server", sim.url, "--model", sim.model,
                     "--workers", "2", "--count", "30")  # fmt: skip
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 120
        shards = out / "shards"
        while time.monotonic() < deadline and not any(shards.glob("*.jsonl*")):
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert again.returncode == 0, again.stderr[-2000:]
    _clean(out, 30)


@pytest.mark.slow
def test_two_workers_on_the_embedded_engine_write_valid_records(
    cluster: str, tmp_path: Path
) -> None:
    """Each worker actor hosts its own llama.cpp server with as many threads as the CPUs it
    reserves (``worker_cpus``, 1), so the two share this box's two cores. One record: the
    small model keeps a few per cent of its answers."""
    out = tmp_path / "out"
    cmd = _build(out, cluster, "--workers", "2", "--count", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _clean(out, 1)
    assert all(r.provenance.engine == "embedded" for r in read(out))


def test_an_embedded_worker_gets_as_many_threads_as_it_reserves_cpus() -> None:
    from dreamgen.config import Config
    from dreamgen.engines.ray_executor import worker_config

    config = Config(engine="embedded", executor={"kind": "ray", "worker_cpus": 2})
    assert worker_config(config, 0).embedded_threads == 2
    assert worker_config(config, 0).executor.kind == "local"
    pinned = config.model_copy(update={"embedded_threads": 1})
    assert worker_config(pinned, 1).embedded_threads == 1  # a set value is kept
    local = Config(engine="embedded")
    assert local.embedded_threads is None  # outside Ray: llama.cpp's default, every core
