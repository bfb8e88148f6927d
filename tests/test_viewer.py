"""`dreamgen view` on bad input, as a subprocess over HTTP: torn and hand-edited shards, a
missing manifest, a port in use, not an output folder, a store that grows while viewed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest import make_record

from dreamgen.record import Record
from dreamgen.store import Store
from dreamgen.viewindex import fts_terms, judge_scores

ROOT = Path(__file__).resolve().parent.parent


def recs(n: int, start: int = 0) -> list[Record]:
    return [
        make_record(
            [("user", f"Write the loader number {i} in plain Python, no pandas.")],
            f"Here is loader {i} in plain Python.",
            f"Loader {i} is nicer with pandas.",
            [(0, "no pandas")],
            rid=None,
            difficulty=1 + i % 5,
        )
        for i in range(start, start + n)
    ]


def make_store(out: Path, n: int = 6, shard_records: int = 3) -> list[Record]:
    rs = recs(n)
    with Store(out, shard_records=shard_records) as st:
        for r in rs:
            st.add(r)
    return rs


class View:
    def __init__(self, out: Path, cache: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dreamgen", "view", str(out), "--cache", str(cache), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert " at http://" in line, self.proc.communicate(timeout=20)
        self.url = line.split(" at ", 1)[1].split()[0]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def settle(self, records: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = orjson.loads(self.get("api/status")[1])
            if not st["building"] and st["records"] >= records:
                return
            time.sleep(0.2)
        raise AssertionError(f"index did not reach {records} records: {st}")

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        assert "Traceback" not in err
        return err


@pytest.fixture
def view(tmp_path: Path) -> Iterator[list[View]]:
    views: list[View] = []
    yield views
    for v in views:
        if v.proc.poll() is None:
            v.stop()


def test_torn_and_hand_edited_shards_are_shown_around(tmp_path: Path, view: list[View]) -> None:
    out = tmp_path / "out"
    rs = make_store(out)
    shard = out / "shards" / "part-000000.jsonl"
    lines = shard.read_bytes().splitlines()
    bad = orjson.loads(lines[1])
    bad["cues"][0]["start"] += 1  # offsets no longer match the text: not a valid Record
    shard.write_bytes(b"\n".join([b"{not json", orjson.dumps(bad), lines[2]]) + b'\n{"id": "to')
    v = View(out, tmp_path / "cache", "--port", "0")
    view.append(v)
    v.settle(5)
    status, page = v.get("")
    assert status == 200
    assert "part-000000.jsonl:1" in page and "part-000000.jsonl:4" in page  # named, not hidden
    assert page.count("<tr data-rid") == 5  # 3 from the other shard; the edited and the good
    status, page = v.get(f"r/{rs[1].id}")
    assert status == 200 and "not a valid record" in page and "span text" in page
    status, page = v.get(f"r/{rs[2].id}")
    assert status == 200 and page.count("<mark class='cue'") == 1


def test_missing_manifest_still_lists_records(tmp_path: Path, view: list[View]) -> None:
    out = tmp_path / "out"
    make_store(out)
    (out / "manifest.json").unlink()
    v = View(out, tmp_path / "cache", "--port", "0")
    view.append(v)
    v.settle(6)
    assert v.get("")[1].count("<tr data-rid") == 6
    status, page = v.get("coverage")
    assert status == 200 and "manifest.json is missing" in page
    assert v.get("rejected")[0] == 200


def test_port_in_use_and_not_an_output_folder_are_one_line_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_store(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "dreamgen", "view", str(out), "--port", str(port),
             "--cache", str(tmp_path / "c")],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is in use" in lines[0], proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "dreamgen", "view", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and "not a dreamgen output folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_follows_new_shards_and_rebuilds_when_one_changes(tmp_path: Path, view: list[View]) -> None:
    out = tmp_path / "out"
    make_store(out)
    cache = tmp_path / "cache"
    v = View(out, cache, "--port", "0")
    view.append(v)
    v.settle(6)
    more = recs(3, start=100)
    with Store(out, shard_records=3) as st:  # a live writer closes another shard
        for r in more:
            st.add(r)
    v.settle(9)
    ones = sum(r.difficulty == 1 for r in recs(6) + more)
    assert v.get("?difficulty=1")[1].count("<tr data-rid") == ones
    v.stop()
    # reopening uses the index on disk; a hand-removed shard makes it rebuild, not lie
    (out / "shards" / "part-000000.jsonl").unlink()
    v2 = View(out, cache, "--port", "0")
    view.append(v2)
    v2.settle(6)
    time.sleep(0.5)
    page = v2.get("")[1]
    assert page.count("<tr data-rid") == 6 and "index rebuilt" in page


def test_search_terms_and_judge_scores() -> None:
    assert (
        fts_terms('no "pandas" OR drop; table')
        == '"no" AND "pandas" AND "OR" AND "drop" AND "table"'
    )
    assert fts_terms("  ") == ""
    q = {"judged": True, "judge_coherence": 4, "judge_agree": True, "labels_agree": True}
    assert judge_scores(q) == {"judge_coherence": 4.0}
    assert judge_scores({**q, "judged": False}) is None  # defaults of an unjudged record
    assert judge_scores({"judge_agree": True, "pair_of": ""}) is None


def test_an_unjudged_record_shows_no_judge_scores() -> None:
    from dreamgen.viewpages import record_page

    rec = recs(1)[0]
    page = record_page(rec, known=set(), children=[], pairs=[])
    assert "copy_share" in page and "judge_coherence" not in page  # defaults, not zeros
    judged = rec.model_copy(
        update={"quality": rec.quality.model_copy(update={"judged": True, "judge_coherence": 4})}
    )
    page = record_page(judged, known=set(), children=[], pairs=[])
    assert "<th>judge_coherence</th><td>4</td>" in page
