from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cli import dreamgen
from hypothesis import HealthCheck, settings

from dreamgen.cards import CardSet
from dreamgen.engines import EmbeddedServer
from dreamgen.record import Record, content_id
from dreamgen.scenario import Scenario

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so bench/ can import tests.fake_vllm (the simulated vLLM server)

# Property tests check what holds, not how fast: on a loaded 2-core CI box hypothesis's
# 200 ms deadline and its too-slow health check fail tests that are correct.
settings.register_profile("dreamgen", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dreamgen")


@pytest.fixture(scope="session")
def cards() -> CardSet:
    return CardSet.load()


@pytest.fixture
def scenario(cards: CardSet) -> Scenario:
    """A hand-written worked example from the shipped cards."""
    return cards.examples[0].model_copy(deep=True)


# `make demo`'s build, shortened: the embedded model keeps ~5% of its answers, so each
# record costs minutes on two cores (the full 20-record demo is measured by hand).
DEMO_COUNT = 2


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real `dreamgen build` on the embedded model (seed 0, ``DEMO_COUNT`` records)
    that several tests read: its OUT folder and its stdout. Fails the tests that use it
    when the build fails."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = dreamgen(
        "build", "--count", str(DEMO_COUNT), "--seed", "0", "--quiet", "--out", str(out),
        timeout=3000,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="session")
def embedded_url() -> Iterator[str]:
    """The real embedded llama.cpp server with SmolLM2, shared by the session's tests."""
    with EmbeddedServer(parallel=2) as server:
        yield server.url


AXES = {
    "cue_kind": "constraint",
    "distractor_kind": "better_tool",
    "domain": "systems_programming",
    "emotion": "tired",
    "momentum": "executing",
}
PROVENANCE = {
    "card": "c",
    "prompt_hash": "h",
    "model": "m",
    "engine": "e",
    "dreamgen_version": "0",
    "created_at": 0.0,
}


def make_record(
    messages: Sequence[tuple[str, str]],
    target: str,
    contrast: str,
    cues: Sequence[tuple[int, str]],
    distractors: Sequence[tuple[int | str, str]] = (),
    *,
    rid: str | None = "r1",
    axes: dict[str, str] | None = None,
    kind: str = "k",
    **fields: Any,
) -> Record:
    """A valid Record built by hand for a test: each span is ``(message, text)`` and is
    placed at the first occurrence of ``text`` in that message (``"contrast"`` names the
    contrast response). ``rid=None`` gives the content hash as the id; ``fields`` set any
    other Record field (``difficulty``, ``split``, ``group_id``, ...)."""
    contents: dict[int | str, str] = {i: c for i, (_, c) in enumerate(messages)}
    contents["contrast"] = contrast

    def span(where: int | str, text: str) -> dict[str, object]:
        start = contents[where].index(text)
        return {
            "message": len(messages) + 1 if where == "contrast" else where,
            "start": start,
            "end": start + len(text),
            "kind": kind,
            "text": text,
        }

    data = {
        "id": rid or "draft",
        "messages": [{"role": r, "content": c} for r, c in messages],
        "target": {"role": "assistant", "content": target},
        "contrast": {"role": "assistant", "content": contrast},
        "cues": [span(m, t) for m, t in cues],
        "distractors": [span(m, t) for m, t in distractors],
        "axes": {**AXES, **(axes or {})},
        "difficulty": 2,
        "group_id": rid or "g",
        "provenance": PROVENANCE,
        **fields,
    }
    record = Record.model_validate(data)
    if rid is None:
        record = record.model_copy(
            update={"id": content_id(record.messages, record.target, record.contrast)}
        )
    return record
