"""Dedup memory and speed as the index grows: the on-disk index beside the in-memory one.

Each size runs in its own process (peak RSS is per process). Rows are random MinHash
signatures (the cost of computing a signature from text is the same for both and is left
out); the hit rate is measured on real text: near-duplicate pairs (one word in ten
changed) and unrelated texts, checked by both indexes. Figures are ratios measured side by
side in one run:

    python bench/dedup_memory.py --sizes 10000,100000,1000000

``inmemory`` is the former design (a Python set of exact keys + datasketch's MinHashLSH);
``ondisk`` is ``dreamgen.dedup.Dedup`` (SQLite index beside the append-only log).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_kb() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    return [" ".join(rng.choices(vocab, k=120)) for _ in range(n)]


def _perturb(text: str, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in range(0, len(words), 40):  # ~7% of 3-shingles change: Jaccard ~0.86
        words[i + rng.randrange(min(40, len(words) - i))] = "changed"
    return " ".join(words)


def worker(kind: str, n: int, out: Path) -> dict[str, float]:
    from datasketch import MinHash, MinHashLSH

    from dreamgen.dedup import SCHEME, Dedup

    base_kb = _rss_kb()
    rng = np.random.default_rng(0)
    probe = Dedup(None)  # for signatures only
    texts = _texts(500, seed=1)
    sigs = [probe.signature(t) for t in texts]
    near = [probe.signature(_perturb(t, i)) for i, t in enumerate(texts)]
    other = [probe.signature(t) for t in _texts(500, seed=2)]
    perms = probe._perms  # the same permutations, so signatures compare
    batch = 32
    t0 = time.perf_counter()
    if kind == "ondisk":
        d = Dedup(out)
        for i in range(n):
            hv = rng.integers(0, 2**32, size=d.num_perm, dtype=np.uint64).astype(np.uint32)
            mh = MinHash(num_perm=d.num_perm, hashvalues=hv, scheme=SCHEME, permutations=perms)
            key = i.to_bytes(16, "little")
            if d.check(key, mh) is None:
                d.add(key, mh)
            if i % batch == batch - 1:
                d.sync()
        for key, mh in sigs:
            d.add(key, mh)
        d.sync()
        elapsed = time.perf_counter() - t0
        hits = sum(d.check(k, m) is not None for k, m in near)
        false = sum(d.check(k, m) is not None for k, m in other)
        d.close()
    else:
        lsh = MinHashLSH(threshold=0.8, num_perm=128)
        exact: set[bytes] = set()
        log = os.open(out / "signatures.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        buf = bytearray()
        for i in range(n):
            hv = rng.integers(0, 2**32, size=128, dtype=np.uint64).astype(np.uint32)
            mh = MinHash(num_perm=128, hashvalues=hv, scheme=SCHEME, permutations=perms)
            key = i.to_bytes(16, "little")
            if key not in exact and not lsh.query(mh):
                exact.add(key)
                lsh.insert(key.hex(), mh, check_duplication=False)
                buf += key + hv.tobytes()
            if i % batch == batch - 1:  # the former design fsynced the same log
                os.write(log, buf)
                os.fsync(log)
                buf = bytearray()
        for key, mh in sigs:
            exact.add(key)
            lsh.insert(key.hex(), mh, check_duplication=False)
        elapsed = time.perf_counter() - t0
        os.close(log)
        hits = sum(k in exact or bool(lsh.query(m)) for k, m in near)
        false = sum(k in exact or bool(lsh.query(m)) for k, m in other)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n": n,
        "rss_kb": _rss_kb() - base_kb,
        "peak_kb": peak,
        "us_per_record": 1e6 * elapsed / n,
        "near_hit_rate": hits / len(near),
        "false_hit_rate": false / len(other),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "N"))
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    if args.worker:
        kind, n = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(kind, n, args.dir)))
        return
    print(f"load: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in ("inmemory", "ondisk"):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--worker", kind, str(n), "--dir", tmp]
                res = json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)
                res["kind"] = kind
                res["disk_mb"] = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
                rows.append(res)
                print(json.dumps(res), flush=True)
    print(f"{'kind':9} {'n':>8} {'peak MiB':>9} {'us/rec':>7} {'near hit':>8} {'false':>6}")
    for r in rows:
        print(
            f"{r['kind']:9} {r['n']:8} {r['peak_kb'] / 1024:9.1f} {r['us_per_record']:7.1f} "
            f"{r['near_hit_rate']:8.3f} {r['false_hit_rate']:6.3f}"
        )
    for kind in ("inmemory", "ondisk"):
        mine = [r for r in rows if r["kind"] == kind]
        if len(mine) >= 2:
            print(f"{kind}_peak_ratio_{mine[-1]['n']}_{mine[0]['n']}: "
                  f"{mine[-1]['peak_kb'] / mine[0]['peak_kb']:.3f}")  # fmt: skip
    print(f"load: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
