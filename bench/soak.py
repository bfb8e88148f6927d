"""Crash soak: SIGKILL a real `dreamgen build` at seeded random moments, restart, check.

Each cycle starts ``dreamgen build`` (the real CLI, in a fresh process) against a simulated
vLLM server (``tests/fake_vllm.py``, its own process) and SIGKILLs it after a random delay
drawn from a seeded RNG — during start-up and recovery, mid-generation, mid-flush,
mid-rotation, mid-manifest. After the kills, one last run goes on to the target
undisturbed. Then it checks the contract:

- the target count reached, exactly; no open shard left;
- zero duplicates: ids, normalised content, and near-duplicates (MinHash at the threshold);
- zero torn lines in closed shards;
- every record ever reported accepted is present (lost = 0): the build runs through a
  small driver that wraps the CLI's ``Run`` so each record handed to ``on_record`` (which
  the pipeline calls only after fsync) is appended to a report file with ``os.write``
  before anything else sees it — a completed ``write`` survives SIGKILL;
- the manifest consistent and ``dreamgen validate OUT`` clean.

    python bench/soak.py --kills 200 --seed 0          # prints the numbers as JSON

``tests/test_crash.py`` runs it with 20+ kills (``DREAMGEN_SOAK_KILLS`` overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dreamgen.audit import audit  # noqa: E402
from dreamgen.dedup import Dedup, conversation_text, exact_key  # noqa: E402
from dreamgen.reader import read  # noqa: E402
from dreamgen.store import MANIFEST, SHARDS  # noqa: E402
from tests.fake_vllm import SimProcess  # noqa: E402

# The CLI with one addition: every record the pipeline reports (on_record, after fsync)
# is appended to argv[1] first. A property, so the CLI may still set its own callback.
DRIVER = r"""
import os, sys
import dreamgen.cli as cli
from dreamgen.pipeline import Run

fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

class ReportingRun(Run):
    _chained = None

    @property
    def on_record(self):
        return self._report

    @on_record.setter
    def on_record(self, callback):
        self._chained = callback

    def _report(self, record):
        os.write(fd, (record.id + "\n").encode())
        if self._chained is not None:
            self._chained(record)

cli.Run = ReportingRun
sys.argv = ["dreamgen", *sys.argv[2:]]
cli.main()
"""

CONFIG = """\
concurrency = 48
[store]
shard_records = 25
shard_age_s = 1.5
flush_records = 4
flush_interval_s = 0.05
[plan]
evolve_share = 0.3
"""


@dataclass
class SoakResult:
    kills: int = 0
    kills_mid_write: int = 0  # kills in a cycle that had reported records
    early_exits: int = 0  # cycles that ended before their kill (should be 0)
    target: int = 0
    records: int = 0
    reported: int = 0
    lost: int = 0
    duplicate_ids: int = 0
    duplicate_content: int = 0
    near_duplicates: int = 0
    torn_lines: int = 0
    open_shards_left: int = 0
    torn_tails_recovered: int = 0
    shards: int = 0
    validate_rc: int | None = None
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.records == self.target
            and self.lost == 0
            and self.duplicate_ids == 0
            and self.duplicate_content == 0
            and self.near_duplicates == 0
            and self.torn_lines == 0
            and self.open_shards_left == 0
            and self.early_exits == 0
            and self.validate_rc == 0
            and not self.problems
        )


def build_cmd(report: Path, out: Path, config: Path, url: str, model: str, target: int, seed: int):
    return [
        sys.executable,
        "-c",
        DRIVER,
        str(report),
        "build",
        "--config",
        str(config),
        "--count",
        str(target),
        "--out",
        str(out),
        "--server",
        url,
        "--model",
        model,
        "--seed",
        str(seed),
        "--quiet",
    ]


def soak(
    work: Path,
    *,
    kills: int,
    seed: int = 0,
    per_kill: int = 30,
    max_kill_s: float = 1.5,
    speedup: float = 5.0,
    log: Any = None,
) -> SoakResult:
    """Run the soak in ``work`` (OUT = work/out); returns the numbers."""
    say = log or (lambda *_: None)
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    out, report, config = work / "out", work / "reported.txt", work / "soak.toml"
    config.write_text(CONFIG)
    target = max(200, kills * per_kill)
    res = SoakResult(target=target)
    t0 = time.monotonic()
    sim_args = ("--profile", "8b", "--speedup", str(speedup), "--seed", str(seed))
    with SimProcess(*sim_args) as sim:
        cmd = build_cmd(report, out, config, sim.base_url, sim.model, target, seed)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        while res.kills < kills:
            before = _size(report)
            # A quarter of the kills land at a random moment of start-up, recovery and
            # restore; the rest once this cycle has reported a random number of records,
            # plus a random few milliseconds (mid-generation, mid-flush, mid-rotation,
            # mid-manifest). Counting records keeps each cycle's share of the target the
            # same on a fast machine and a slow one.
            early = rng.random() < 0.25
            delay = rng.uniform(0.05, max_kill_s) if early else rng.uniform(0.0, 0.05)
            after = 0 if early else rng.randint(1, per_kill // 2)
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            if _wait_for_kill(proc, report, before, delay, after):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                res.kills += 1
                res.kills_mid_write += _size(report) > before
                if res.kills % 10 == 0:
                    say(f"kill {res.kills}/{kills}: {_count_reported(report)} reported")
                continue
            err = proc.stderr.read().decode() if proc.stderr else ""
            res.early_exits += 1
            say(f"build exited before its kill (rc {proc.returncode}): {err.strip()[-500:]}")
            if proc.returncode != 0 or _state(out) == "complete":
                break  # a failing build, or the target reached too soon: stop and report
        final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if final.returncode != 0:
            res.problems.append(f"final build rc {final.returncode}: {final.stderr[-800:]}")
    _check(out, report, res)
    res.elapsed_s = round(time.monotonic() - t0, 1)
    return res


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _wait_for_kill(
    proc: subprocess.Popen[bytes], report: Path, before: int, delay: float, after: int
) -> bool:
    """Wait for the kill moment; False if the process ended first.

    ``after`` = 0: ``delay`` after the start; else ``delay`` after the cycle has reported
    ``after`` records (or 30 s without them).
    """
    start = time.monotonic()
    deadline = start + delay if after == 0 else None
    line = 33  # a reported id and its newline
    while proc.poll() is None:
        now = time.monotonic()
        if deadline is None and (_size(report) - before >= after * line or now - start > 30):
            deadline = now + delay
        if deadline is not None and now >= deadline:
            return True
        time.sleep(0.002)
    return False


def _count_reported(report: Path) -> int:
    return len(_reported(report))


def _reported(report: Path) -> list[str]:
    if not report.exists():
        return []
    data = report.read_bytes()
    return [ln.decode() for ln in data.split(b"\n")[:-1] if ln]  # complete lines only


def _state(out: Path) -> str | None:
    with contextlib.suppress(OSError, orjson.JSONDecodeError):
        return orjson.loads((out / MANIFEST).read_bytes()).get("state")
    return None


def _check(out: Path, report: Path, res: SoakResult) -> None:
    shards = sorted((out / SHARDS).glob("part-*.jsonl"))
    res.shards = len(shards)
    res.open_shards_left = len(list((out / SHARDS).glob("*.open")))
    for shard in shards:
        data = shard.read_bytes()
        if data and not data.endswith(b"\n"):
            res.torn_lines += 1
        for line in data.splitlines():
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                res.torn_lines += 1
    records = list(read(out))
    res.records = len(records)
    ids = [r.id for r in records]
    res.duplicate_ids = len(ids) - len(set(ids))
    dedup = Dedup(None)
    keys: set[bytes] = set()
    for r in records:
        text = conversation_text(r)
        key = exact_key(text)
        if key in keys:
            res.duplicate_content += 1
            continue
        keys.add(key)
        k, mh = dedup.signature(text)
        if dedup.check(k, mh) is not None:
            res.near_duplicates += 1
        dedup.add(k, mh)
    reported = _reported(report)
    res.reported = len(set(reported))
    res.lost = len(set(reported) - set(ids))
    valid, problems = audit(out)
    res.problems += problems
    manifest = orjson.loads((out / MANIFEST).read_bytes())
    if manifest.get("state") != "complete":
        res.problems.append(f"manifest state {manifest.get('state')!r}, expected 'complete'")
    if manifest.get("records") != res.target or valid != res.target:
        res.problems.append(f"manifest records {manifest.get('records')}, valid {valid}")
    res.torn_tails_recovered = manifest.get("recovery", {}).get("torn_lines_dropped", 0)
    check = subprocess.run(
        [sys.executable, "-m", "dreamgen", "validate", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    res.validate_rc = check.returncode
    if check.returncode != 0:
        res.problems.append(f"dreamgen validate: {check.stdout[-800:]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-kill", type=int, default=30, help="target = kills * this")
    ap.add_argument("--work", type=Path, default=None, help="folder (default: a temp dir)")
    a = ap.parse_args(argv)
    import tempfile

    work = a.work or Path(tempfile.mkdtemp(prefix="dreamgen-soak-"))
    res = soak(
        work,
        kills=a.kills,
        seed=a.seed,
        per_kill=a.per_kill,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(orjson.dumps({**asdict(res), "ok": res.ok, "work": str(work)}).decode())
    sys.exit(0 if res.ok else 1)


if __name__ == "__main__":
    main()
