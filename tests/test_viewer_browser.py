"""`dreamgen view` driven by a real headless Chromium (Debian's package, via Playwright).

A store built by `dreamgen build` against the simulated vLLM server (evolution and minimal
pairs on, faults that force rejections), plus one hand-written shard with hostile HTML; the
viewer runs as a subprocess on an ephemeral loopback port. Expected values come from
reading the shards directly, never from the viewer's own code. Screenshots go to the
test's tmp folder and to /tmp/dreamgen-shots/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_record
from fake_vllm import SimProcess

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/dreamgen-shots")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BEFORE: dict[str, tuple[int, int, str]] = {}  # the store's files before the viewer started
HOSTILE = "<script>window.pwned = 1</script><img src=x onerror='window.pwned=2'>"

if not CHROMIUM.exists():
    pytest.skip(
        "no /usr/bin/chromium (make test installs Debian's chromium: make browser)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra)")


def shard_records(out: Path) -> list[dict[str, Any]]:
    """Every record line of the closed shards, parsed with orjson (not the viewer's code)."""
    rows = []
    for shard in sorted((out / "shards").glob("part-*.jsonl")):
        rows += [orjson.loads(line) for line in shard.read_bytes().splitlines() if line.strip()]
    return rows


def content_of(rec: dict[str, Any], message: int) -> str:
    n = len(rec["messages"])
    if message == n:
        return str(rec["target"]["content"])
    if message == n + 1:
        return str(rec["contrast"]["content"])
    return str(rec["messages"][message]["content"])


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(folder)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("view") / "out"
    cfg = out.parent / "c.toml"
    cfg.write_text("[plan]\nevolve_share = 0.5\nminimal_pairs = 0.5\n[store]\nshard_records = 10\n")
    with SimProcess("--profile", "8b", "--speedup", "50", "--fault", "malformed=0.15") as sim:
        proc = subprocess.run(
            [sys.executable, "-m", "dreamgen", "build", "--server", sim.url, "--model", sim.model,
             "--count", "40", "--out", str(out), "--config", str(cfg), "--quiet", "--seed", "5",
             "--concurrency", "4"],  # a small window: evolution needs accepted parents
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    hostile = make_record(
        [
            ("user", f"Fix the parser. {HOSTILE} Keep it in one file."),
            ("assistant", "We could split it into <b>modules</b>."),
            ("user", "No. Keep it in one file, as I said."),
        ],
        "Understood: one file.",
        "Splitting into modules is better.",
        [(0, HOSTILE), (2, "Keep it in one file")],
        [(1, "split it into <b>modules</b>")],
        rid=None,
    )
    line = orjson.dumps(hostile.model_dump(mode="json")) + b"\n"
    (out / "shards" / "part-000900.jsonl").write_bytes(line)  # a hand-added closed shard
    return out


@pytest.fixture(scope="module")
def viewer(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cache = tmp_path_factory.mktemp("cache")
    BEFORE.update(snapshot(store))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dreamgen",
            "view",
            str(store),
            "--port",
            "0",
            "--cache",
            str(cache),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert " at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.stderr else "")
    url = line.split(" at ", 1)[1].split()[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for the first indexing pass
        with urllib.request.urlopen(url + "api/status", timeout=5) as r:
            if not orjson.loads(r.read())["building"]:
                break
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == []  # no JavaScript errors on any page


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / path.name)
    assert path.stat().st_size > 5000


def test_list_filter_by_cue_kind(store: Path, viewer: str, page: Any, tmp_path: Path) -> None:
    recs = shard_records(store)
    page.goto(viewer)
    assert page.locator("#records tr[data-rid]").count() == min(50, len(recs))
    shot(page, tmp_path, "list")
    kind = recs[0]["axes"]["cue_kind"]
    expected = sorted(r["id"] for r in recs if r["axes"]["cue_kind"] == kind)
    with page.expect_navigation():
        page.select_option("select[name=cue_kind]", kind)  # the page's JS submits the form
    rows = page.locator("#records tr[data-rid]")
    shown = sorted(
        rows.nth(i).locator("a.rec").get_attribute("href").rsplit("/", 1)[1]
        for i in range(rows.count())
    )
    assert shown == expected[:50] if len(expected) <= 50 else len(shown) == 50
    assert page.locator("#matches").inner_text() == str(len(expected))
    shot(page, tmp_path, "list-filtered")


def test_search_finds_a_word(store: Path, viewer: str, page: Any) -> None:
    rec = shard_records(store)[3]
    word = max(rec["target"]["content"].split(), key=len).strip(".,;:!?()'\"")
    page.goto(viewer)
    page.fill("input[name=q]", word)
    with page.expect_navigation():
        page.click("button[type=submit]")
    hrefs = [a.get_attribute("href") for a in page.locator("a.rec").all()]
    assert f"/r/{rec['id']}" in hrefs


def test_record_spans_are_the_cue_text_at_their_offsets(
    store: Path, viewer: str, page: Any, tmp_path: Path
) -> None:
    recs = [r for r in shard_records(store) if r["distractors"] and r["mode"] != "minimal_pair"]
    rec = recs[0]
    page.goto(viewer)
    with page.expect_navigation():
        page.click(f"a.rec[href='/r/{rec['id']}']")
    marks = page.locator("mark")
    assert marks.count() == len(rec["cues"]) + len(rec["distractors"])
    labelled = {
        (cls, s["message"], s["start"], s["end"], s["kind"])
        for cls, key in (("cue", "cues"), ("distractor", "distractors"))
        for s in rec[key]
    }
    seen = set()
    for i in range(marks.count()):
        m = marks.nth(i)
        cls = m.get_attribute("class")
        msg, start, end = (int(m.get_attribute(f"data-{k}")) for k in ("message", "start", "end"))
        assert m.text_content() == content_of(rec, msg)[start:end]
        seen.add((cls, msg, start, end, m.get_attribute("data-kind")))
        assert m.get_attribute("title") == f"{cls}: {m.get_attribute('data-kind')}"  # on hover
    assert seen == labelled
    # listening and reflex side by side
    target = page.locator(f".msg[data-message='{len(rec['messages'])}'] .content")
    contrast = page.locator(f".msg[data-message='{len(rec['messages']) + 1}'] .content")
    assert target.text_content() == rec["target"]["content"]
    assert contrast.text_content() == rec["contrast"]["content"]
    tb, cb = target.bounding_box(), contrast.bounding_box()
    assert abs(tb["y"] - cb["y"]) < 5 and cb["x"] > tb["x"] + tb["width"] - 1
    shot(page, tmp_path, "record")


def test_lineage_links_lead_to_parent_and_pairs(store: Path, viewer: str, page: Any) -> None:
    recs = shard_records(store)
    ids = {r["id"] for r in recs}
    child = next(r for r in recs if r["parent_id"] in ids and r["mode"] == "evolved")
    page.goto(f"{viewer}r/{child['id']}")
    with page.expect_navigation():
        page.click(f"a.lineage[href='/r/{child['parent_id']}']")
    assert page.url.endswith(f"/r/{child['parent_id']}")
    assert child["parent_id"] in page.locator("h2").inner_text()
    # and back down: the parent lists the child
    assert page.locator(f"a.lineage[href='/r/{child['id']}']").count() == 1
    pair = next(r for r in recs if r["mode"] == "minimal_pair")
    page.goto(f"{viewer}r/{pair['quality']['pair_of']}")
    with page.expect_navigation():
        page.click(f"a.lineage[href='/r/{pair['id']}']")
    assert pair["id"] in page.locator("h2").inner_text()


def test_hostile_html_renders_as_text(store: Path, viewer: str, page: Any, tmp_path: Path) -> None:
    line = (store / "shards" / "part-000900.jsonl").read_bytes()
    rec = orjson.loads(line)
    page.goto(f"{viewer}r/{rec['id']}")
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("img[src=x]").count() == 0 and page.locator("main b").count() == 0
    first = page.locator(".msg[data-message='0'] .content")
    assert first.text_content() == rec["messages"][0]["content"]
    assert page.locator("mark.cue").first.text_content() == HOSTILE
    shot(page, tmp_path, "hostile")


def test_rejections_and_coverage_pages(store: Path, viewer: str, page: Any, tmp_path: Path) -> None:
    page.goto(viewer + "rejected")
    with page.expect_navigation():
        page.click("a[href='/rejected?reason=invalid_json']")
    raws = page.locator("pre.raw")
    assert raws.count() >= 1
    kept = [
        orjson.loads(x)
        for x in (store / "rejected" / "invalid_json.jsonl").read_bytes().split(b"\n")
        if x
    ]
    assert {raws.nth(i).text_content() for i in range(raws.count())} == {k["raw"] for k in kept}
    shot(page, tmp_path, "rejections")
    page.goto(viewer + "coverage")
    manifest = orjson.loads((store / "manifest.json").read_bytes())
    cells = [c for c in manifest["coverage"] if c["difficulty"] != "*"]
    assert page.locator("table.heat td.cell").count() >= len(cells)
    shot(page, tmp_path, "coverage")


def test_report_opens_in_the_browser(store: Path, page: Any, tmp_path: Path) -> None:
    page.goto((store / "report" / "report.html").as_uri())
    imgs = page.locator("img")
    assert imgs.count() >= 4
    for i in range(imgs.count()):  # every embedded image decodes
        assert page.evaluate("(el) => el.naturalWidth", imgs.nth(i).element_handle()) > 100
    shot(page, tmp_path, "report")


def test_the_viewer_wrote_nothing_to_the_store(store: Path, viewer: str, page: Any) -> None:
    for path in ("", "coverage", "rejected", "?q=file&cue_kind=correction", "r/nope"):
        page.goto(viewer + path)
    assert BEFORE and snapshot(store) == BEFORE
    assert os.listdir(store / "shards")  # sanity: the store is there
