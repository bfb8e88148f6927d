"""Crash test with real processes and real signals.

``dreamgen build`` (the real CLI, against the simulated vLLM server) SIGKILLed at seeded
random moments, restarted each time, then run to its target; the harness and its checks
are ``bench/soak.py``. 20 kills here; ``DREAMGEN_SOAK_KILLS=200`` for a soak
(``DREAMGEN_SOAK_SEED`` picks the seed). Torn-tail recovery on hand-made files is in
``test_store.py`` (SIGKILL rarely tears a line: Linux finishes most page-cache writes).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import orjson

from bench.soak import soak

ROOT = Path(__file__).resolve().parent.parent


def test_sigkilled_build_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    kills = int(os.environ.get("DREAMGEN_SOAK_KILLS", "20"))
    seed = int(os.environ.get("DREAMGEN_SOAK_SEED", "0"))
    res = soak(tmp_path, kills=kills, seed=seed, per_kill=20, log=print)
    print(orjson.dumps(asdict(res)).decode())
    assert res.kills == kills and res.early_exits == 0
    assert res.kills_mid_write >= kills // 3, "too few kills landed while records flowed"
    assert res.records == res.target, res.problems
    assert (res.duplicate_ids, res.duplicate_content, res.near_duplicates) == (0, 0, 0)
    assert res.torn_lines == 0 and res.open_shards_left == 0
    assert res.reported > 0 and res.lost == 0
    assert res.validate_rc == 0 and res.problems == []
