"""Dedup: exact and near duplicates, persistence across resumes and runs, decontamination."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from fake_vllm import SimProcess
from test_store import make_record

from dreamgen.audit import audit
from dreamgen.dedup import LOG, Dedup, DedupError, conversation_text, load_heldout
from dreamgen.store import MANIFEST

ROOT = Path(__file__).resolve().parent.parent


def test_exact_and_near_duplicates() -> None:
    d = Dedup(None)
    text = conversation_text(make_record(1))
    key, mh = d.signature(text)
    assert d.check(key, mh) is None
    d.add(key, mh)
    assert d.check(*d.signature(text.upper() + "  ")) == "duplicate"  # normalised text
    words = text.split()
    words[10] = "changed"
    assert d.check(*d.signature(" ".join(words))) == "near_duplicate"
    assert d.check(*d.signature(conversation_text(make_record(2)))) is None


def test_the_index_persists_and_a_torn_row_is_cut(tmp_path: Path) -> None:
    d = Dedup(tmp_path)
    sigs = [d.signature(conversation_text(make_record(i))) for i in range(5)]
    for s in sigs[:3]:
        d.add(*s)
    d.sync()
    d.add(*sigs[3])  # added, never synced: as after SIGKILL, not in the log
    log = tmp_path / LOG
    row = log.stat().st_size // 3
    with open(log, "ab") as f:
        f.write(b"\x01" * (row // 2))  # a writer killed mid-row
    d2 = Dedup(tmp_path)
    assert len(d2) == 3 and log.stat().st_size == 3 * row
    assert [d2.check(*s) for s in sigs] == ["duplicate"] * 3 + [None, None]


def test_two_live_runs_sharing_an_index_see_each_other(tmp_path: Path) -> None:
    a, b = Dedup(tmp_path), Dedup(tmp_path)
    sa = a.signature(conversation_text(make_record(1)))
    sb = b.signature(conversation_text(make_record(2)))
    a.add(*sa)
    b.add(*sb)
    a.sync()
    b.sync()  # picks up a's row, then appends its own
    a.sync()
    assert a.check(*sb) == "duplicate" and b.check(*sa) == "duplicate"
    assert len(Dedup(tmp_path)) == 2


def test_an_index_with_other_settings_is_refused(tmp_path: Path) -> None:
    Dedup(tmp_path, num_perm=128).close()
    with pytest.raises(DedupError, match="num_perm: 128 -> 64"):
        Dedup(tmp_path, num_perm=64)


def test_decontamination_compares_the_scenario(tmp_path: Path) -> None:
    held, other = make_record(1, seed=7), make_record(2, seed=7)
    heldout = tmp_path / "eval.jsonl"
    chat = {"messages": [m.model_dump() for m in held.messages] + [held.target.model_dump()]}
    heldout.write_bytes(orjson.dumps(chat) + b"\n" + orjson.dumps({"text": "unrelated"}) + b"\n")
    d = Dedup(None)
    d.add_contaminants(load_heldout(heldout))
    # The same scenario with different responses is still a leak.
    leaked = held.model_copy(update={"target": other.target, "contrast": other.contrast})
    assert d.check(*d.signature(conversation_text(leaked)), leaked) == "contaminated"
    assert d.check(*d.signature(conversation_text(other)), other) is None

    records = tmp_path / "records.jsonl"  # dreamgen records work as a held-out file too
    records.write_bytes(orjson.dumps(held.model_dump(mode="json")) + b"\n")
    assert load_heldout(records) == ["\n".join(m.content for m in held.messages)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\n')
    with pytest.raises(DedupError, match=r"bad.jsonl:1: .*neither 'messages' nor 'text'"):
        load_heldout(bad)


# -- across a resume and across runs (real builds) ----------------------------------------


def build(out: Path, count: int, *extra: str) -> dict:
    """One build against a fresh sim serving its corpus verbatim, in the same order."""
    with SimProcess("--profile", "stress", "--no-unique") as sim:
        proc = subprocess.run(
            [sys.executable, "-m", "dreamgen", "build", "--server", sim.url, "--model",
             sim.model, "--out", str(out), "--count", str(count), "--concurrency", "1",
             "--seed", "1", "--quiet", *extra],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return orjson.loads((out / MANIFEST).read_bytes())


def seen_before(manifest: dict) -> int:
    rejected = manifest["totals"]["rejected"]
    return rejected.get("duplicate", 0) + rejected.get("near_duplicate", 0)


@pytest.mark.parametrize("index", ["kept", "deleted"])
def test_dedup_holds_across_a_resume(tmp_path: Path, index: str) -> None:
    out = tmp_path / "out"
    first = build(out, 10)
    assert first["records"] == 10 and seen_before(first) == 0
    if index == "deleted":  # rebuilt from the stored records on resume
        shutil.rmtree(out / "dedup")
    # The fresh sim replays the same scenarios: the 10 stored ones come back first.
    second = build(out, 15)
    assert second["records"] == 15 and seen_before(second) == 10
    assert audit(out) == (15, [])  # audit checks duplicate ids and content too


def test_a_shared_index_holds_across_runs(tmp_path: Path) -> None:
    config = tmp_path / "shared.toml"
    config.write_text(f'[dedup]\nindex = "{tmp_path / "index"}"\n')
    build(tmp_path / "a", 10, "--config", str(config))
    b = build(tmp_path / "b", 5, "--config", str(config))
    assert seen_before(b) == 10  # b's own store was empty: the shared index knew them
    assert not (tmp_path / "a" / "dedup").exists()


def test_the_lookup_index_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    """index.sqlite is derived: missing, damaged or ahead of the log, it is rebuilt."""
    d = Dedup(tmp_path)
    sigs = [d.signature(conversation_text(make_record(i))) for i in range(4)]
    for s in sigs[:3]:
        d.add(*s)
    d.close()
    index = tmp_path / "index.sqlite"
    index.unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    d2 = Dedup(tmp_path)
    assert len(d2) == 3 and [d2.check(*s) for s in sigs] == ["duplicate"] * 3 + [None]
    d2.close()
    index.write_bytes(b"not a database" * 100)
    d3 = Dedup(tmp_path)
    assert len(d3) == 3 and d3.check(*sigs[0]) == "duplicate"
    d3.close()
    (tmp_path / LOG).write_bytes(b"")  # the log replaced: the index must not outlive it
    d4 = Dedup(tmp_path)
    assert len(d4) == 0 and d4.check(*sigs[0]) is None
