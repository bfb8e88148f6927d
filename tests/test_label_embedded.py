"""`dreamgen label` with an LLM: the real embedded model (SmolLM2 via llama.cpp).

The model is weak; these tests check what must hold whatever it answers: every input
format is read and labelled, every span's text is at its offsets (``read_labelled``
re-checks each one), the prompt stays bounded on a 1 MB turn, bad lines are named, and a
SIGKILLed run resumes with every conversation labelled exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from dreamgen.config import Config
from dreamgen.label_out import LABELLED, REJECTED, STATE
from dreamgen.label_run import LabelJob, LabelRun, LabelSummary
from dreamgen.labelled import Labelled, read_labelled
from dreamgen.serving import EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parent.parent


def chat(*turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


CHAT = chat(
    "I need a button that scrolls to the pricing section. Plain static HTML.",
    "Give the section an id and call scrollIntoView. You might want to move the site to "
    "Next.js so bits like this become components.",
    "Write it in vanilla JS, please. One snippet I can paste before </body>.",
)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def run_llm(url: str, src: Path, out: Path, **job: Any) -> tuple[LabelSummary, list[Labelled]]:
    # The embedded server's llama.cpp gets the schema with string bounds, as embedded does.
    config = Config(
        engine="openai",
        servers=[url],
        model=EMBEDDED_MODEL,
        concurrency=4,
        serving={"schema_dialect": "bounded"},  # type: ignore[arg-type]
    )
    job.setdefault("samples", 1)
    summary = asyncio.run(LabelRun(LabelJob(src, out, "openai", config, **job)).run())
    return summary, list(read_labelled(out / LABELLED))


def test_each_input_format_on_the_real_model(tmp_path: Path, embedded_url: str) -> None:
    openai = write_jsonl(tmp_path / "openai.jsonl", [{"messages": CHAT}])
    roles = {"user": "human", "assistant": "gpt"}
    share = [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT]
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": share}])
    pq.write_table(pa.table({"dialogue": [CHAT]}), tmp_path / "chat.parquet")
    datasets.Dataset.from_list([{"messages": CHAT}]).save_to_disk(str(tmp_path / "hf"))
    inputs: list[tuple[Path, str | None]] = [
        (openai, None),
        (sharegpt, None),
        (tmp_path / "chat.parquet", "dialogue"),
        (tmp_path / "hf", None),
    ]
    for n, (src, column) in enumerate(inputs):
        summary, items = run_llm(embedded_url, src, tmp_path / f"out{n}", column=column)
        assert summary.rejected == Counter(), (src, summary.rejected)
        (item,) = items
        assert [m.content for m in item.messages] == [m["content"] for m in CHAT]
        assert item.provenance is not None and item.provenance.model == EMBEDDED_MODEL
        assert item.provenance.labeller == "llm" and item.provenance.input_index == 0
        assert item.no_direction == (not item.cues)


def test_repeated_phrases_astral_characters_and_a_megabyte_turn(
    tmp_path: Path, embedded_url: str
) -> None:
    repeated = "𝔸😀 the tests pass. 😀 the tests pass. Only touch the parser. 😀 the tests pass."
    huge = "𝔸 the log says ok and the run went well here. " * 21_000 + "Don't change the schema."
    assert len(huge.encode()) > 1_000_000
    rows = [
        {"messages": chat("Go.", "Done; the tests pass. I could also add CI.", repeated)},
        {"messages": chat("Look.", "It looks fine. It might be worth a rewrite.", huge)},
    ]
    summary, items = run_llm(
        embedded_url, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o", samples=2
    )
    assert summary.totals["labelled"] == 2 and not summary.rejected
    # read_labelled has checked text == content[start:end] for every span; also:
    for item in items:
        assert item.confidence is not None and 0.0 <= item.confidence <= 1.0
        for cue in item.cues:
            assert cue.message == len(item.messages) - 1
    # The prompt stays bounded on a 1 MB turn: a few thousand tokens, not a quarter million.
    assert summary.totals["prompt_tokens"] / summary.totals["requests"] < 4096


def test_bad_lines_are_named_and_the_rest_is_labelled(tmp_path: Path) -> None:
    good = orjson.dumps({"messages": CHAT})
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([good, b"", b"[1, 2", good]) + b"\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dreamgen", "label", str(src), "--out", str(out),
         "--engine", "embedded", "--samples", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == f"error: {src}:2: empty line (skipped)"
    assert errors[1].startswith(f"error: {src}:3: not JSON") and len(errors) == 2
    assert "Traceback" not in result.stderr
    assert [i.provenance.input_index for i in read_labelled(out / LABELLED) if i.provenance] in (
        [0, 3],
        [3, 0],
    )
    assert len((out / REJECTED).read_bytes().splitlines()) == 2


def test_resume_after_sigkill_with_the_real_model(tmp_path: Path) -> None:
    n = 8
    turns = [
        (f"Step {i} failed.", "I could rewrite it all.", f"Only fix step {i}.") for i in range(n)
    ]
    rows = [{"messages": chat(*t)} for t in turns]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    # One request in flight: conversations finish in input order, so none is ever "ahead".
    args = [sys.executable, "-m", "dreamgen", "label", str(src), "--out", str(out),
            "--engine", "embedded", "--samples", "1", "--concurrency", "1"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / STATE
    deadline = time.monotonic() + 240
    done = 0
    while time.monotonic() < deadline and done < 2 and proc.poll() is None:
        time.sleep(0.1)
        if state.exists():
            data = orjson.loads(state.read_bytes())
            done = data["done_below"]
            assert data["ahead"] == []  # the window of one was kept
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = orjson.loads(state.read_bytes())["done_below"]
    assert 0 < at_kill < n, "the kill must land mid-run"
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = Counter(i.provenance.input_index for i in read_labelled(out / LABELLED) if i.provenance)
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}
    assert orjson.loads(state.read_bytes())["totals"]["labelled"] == n
