"""`dreamgen export`: every format is loaded by the library that consumes it.

The source is a real store folder of hand-written records (six conversations, split by
hand 4/1/1); `datasets` loads each export through its dataset card, and TRL's SFT and
DPO trainers run two steps on the trl-sft and trl-dpo exports (q_proj only, SmolLM2 from
its GGUF).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from dreamgen.cli import app
from dreamgen.export import ExportError, export
from dreamgen.record import Record
from dreamgen.store import Store
from tests.conftest import make_record

ROOT = Path(__file__).resolve().parent.parent
CONVERSATIONS = [
    ("Use only the standard library for this CSV parser, please.", "I'll add pandas"),
    ("Keep the fix to the single failing test, nothing else.", "Let me refactor the module"),
    ("Don't touch the public API; it is frozen until March.", "I'd rename the endpoint"),
    ("Just rerun with seed 7, no other changes.", "We should switch optimizers"),
    ("Leave the README wording as is, only fix the install line.", "I'll rewrite the intro"),
    ("Stick to bash, we have no Python on the box.", "A Python script is cleaner"),
]
SPLITS = ["train", "train", "train", "train", "eval", "probe"]
TOTALS = {"requests": 10, "rejected": {"invalid_json": 3, "echo": 1}, "records": 6}


def _records() -> list[Record]:
    out = []
    for i, ((decision, reflex), split) in enumerate(zip(CONVERSATIONS, SPLITS, strict=True)):
        cue = decision.split(",")[0].split(";")[0]
        out.append(
            make_record(
                [
                    ("system", "You are a careful coding assistant."),
                    ("user", "I need help with a small change."),
                    ("assistant", f"{reflex}, maybe?"),
                    ("user", decision),
                ],
                target=f"Understood, {cue.lower()}: here is that change and nothing else.",
                contrast=f"{reflex}; it will be better in the long run.",
                cues=[(3, cue)],
                distractors=[(2, reflex), ("contrast", reflex)],
                rid=f"r{i}",
                split=split,
                group_id=f"g{i}",
            )
        )
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("src") / "out"
    store = Store(out, config={"model": "hand-written", "engine": "none"}, fingerprint="fp0123")
    for r in _records():
        store.add(r)
    store.flush()
    coverage = [
        {"cue_kind": "constraint", "distractor_kind": "better_tool", "difficulty": 2, "filled": 6,
         "quota": 8},
    ]  # fmt: skip
    store.close(totals=TOTALS, coverage=coverage)
    return out


def _exchange(row: dict, fmt: str) -> list[dict]:
    """The messages a span's ``message`` index counts through, for each format."""
    if fmt == "trl-sft":
        return [*row["prompt"], *row["completion"], {"content": _contrast(row)}]
    if fmt in ("trl-dpo", "hf"):
        return [*row["prompt"], *row["chosen"], *row["rejected"]]
    assert fmt == "sharegpt"
    turns = [*row["prompt"], row["chosen"], row["rejected"]]
    return [{"content": t["value"]} for t in turns]


def _contrast(row: dict) -> str:
    by_id = {r.id: r for r in _records()}
    return by_id[row["id"]].contrast.content


@pytest.mark.parametrize("fmt", ["trl-sft", "trl-dpo", "sharegpt", "openai-chat", "hf"])
def test_each_format_loads_with_datasets(source: Path, tmp_path: Path, fmt: str) -> None:
    from datasets import load_dataset

    dest = tmp_path / fmt
    result = export(source, fmt, dest)
    assert result.counts == {"train": 4, "eval": 1, "probe": 1}
    ds = load_dataset(
        str(dest), cache_dir=str(tmp_path / "hf-cache")
    )  # through the dataset card's `configs` header
    assert {s: ds[s].num_rows for s in ds} == {"train": 4, "eval": 1, "probe": 1}
    expected = {r.id: r for r in _records()}
    if fmt != "openai-chat":
        assert "messages" not in ds["train"].column_names  # no context-only `messages`
    for split in ds:
        for row in ds[split]:
            if fmt == "openai-chat":
                assert set(row) == {"messages"}
                assert row["messages"][-1]["role"] == "assistant"
                assert row["messages"][-2]["role"] == "user"
                continue
            rec = expected[row["id"]]
            assert row["split"] == split == rec.split
            exchange = _exchange(row, fmt)
            for span in [*row["cues"], *row["distractors"]]:
                content = exchange[span["message"]]["content"]
                assert content[span["start"] : span["end"]] == span["text"]
            if fmt == "trl-sft":
                assert row["prompt"][-1] == {"role": "user", "content": rec.messages[-1].content}
                assert row["completion"] == [{"role": "assistant", "content": rec.target.content}]
            if fmt == "sharegpt":
                assert row["conversations"][-1] == {
                    "from": "gpt", "value": rec.target.content, "train": True,
                }  # fmt: skip
                assert not any(t["train"] for t in row["conversations"][:-1])
                assert [t["from"] for t in row["conversations"]] == [
                    "system", "human", "gpt", "human", "gpt",
                ]  # fmt: skip


def test_openai_chat_sidecar_lines_up(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "oa"
    export(source, "openai-chat", dest)
    rows = [orjson.loads(x) for x in (dest / "train.jsonl").read_bytes().splitlines()]
    side = [orjson.loads(x) for x in (dest / "train.spans.jsonl").read_bytes().splitlines()]
    assert len(rows) == len(side) == 4
    for row, meta in zip(rows, side, strict=True):
        exchange = [*row["messages"], meta["contrast"]]
        for span in [*meta["cues"], *meta["distractors"]]:
            content = exchange[span["message"]]["content"]
            assert content[span["start"] : span["end"]] == span["text"]


def test_hf_save_to_disk_has_every_split(source: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk

    dest = tmp_path / "hf"
    export(source, "hf", dest)
    dd = load_from_disk(str(dest))
    assert {s: dd[s].num_rows for s in dd} == {"train": 4, "eval": 1, "probe": 1}
    row = dd["probe"][0]
    assert row["id"] == "r5"
    assert row["completion"] == row["chosen"]
    assert row["rejected"][0]["content"].startswith("A Python script is cleaner")
    for split in ("train", "eval", "probe"):
        assert (dest / f"{split}.jsonl").is_file()


def test_dataset_card_says_what_the_data_is(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "card"
    export(source, "trl-dpo", dest)
    card = (dest / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "path: train.jsonl" in header and "split: probe" in header
    assert "| train | 4 |" in card and "| eval | 1 |" in card
    assert "6 accepted scenarios from 10 model requests (yield 60.0%)" in card
    assert "| invalid_json | 3 |" in card and "| echo | 1 |" in card
    assert "| constraint | better_tool | 6 | 8 |" in card
    assert "fp0123" in card and "hand-written" in card
    assert "## Licence" in card and "No `messages` column" in card


def test_refusals(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown format"):
        export(source, "alpaca", tmp_path / "x")
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope", "trl-sft", tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export(source, "trl-sft", busy)
    with pytest.raises(ExportError, match="holds no export.json"):
        export(source, "trl-sft", busy, force=True)
    assert (busy / "mine.txt").read_text() == "keep me"
    again = tmp_path / "again"
    export(source, "trl-sft", again)
    export(source, "trl-dpo", again, force=True)  # replaces our own export
    assert orjson.loads((again / "export.json").read_bytes())["format"] == "trl-dpo"
    assert not list(tmp_path.glob(".*tmp-*"))


def test_cli_errors_are_one_line(source: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app, ["export", str(source), "--format", "csv", "--to", str(tmp_path / "a")]
    )
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: unknown format 'csv'")
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["export", str(source), "-f", "trl-sft", "--to", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "exported 6 records as trl-sft" in res.output


def test_push_to_hub_without_token_or_network(source: Path, tmp_path: Path) -> None:
    """Two real subprocesses: no token at all, then a token but an unreachable Hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no stored token there
    cmd = [sys.executable, "-m", "dreamgen", "export", str(source), "-f", "trl-sft"]
    res = subprocess.run(
        [*cmd, "--to", str(tmp_path / "p1"), "--push-to-hub", "me/data"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
        f"(the export in {tmp_path / 'p1'} is complete)"
    ]
    assert (tmp_path / "p1" / "train.jsonl").is_file()
    env.update(HF_TOKEN="hf_notarealtoken", HF_ENDPOINT="http://127.0.0.1:9")
    res = subprocess.run(
        [*cmd, "--to", str(tmp_path / "p2"), "--push-to-hub", "me/data"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Hub"), lines


# -- the consumers that train: TRL, two steps each, q_proj only ---------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    pytest.importorskip("trl")
    from dreamgen.training import load_model

    return load_model("smollm2")


def _only_q_proj(model: object) -> dict[str, object]:
    import torch

    assert isinstance(model, torch.nn.Module)
    before = {}
    for name, p in model.named_parameters():
        p.requires_grad = "q_proj" in name
        before[name] = p.detach().clone()
    return before


def _changed(model: object, before: dict[str, object]) -> set[str]:
    import torch

    assert isinstance(model, torch.nn.Module)
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _trl_run(smollm2: Any, source: Path, tmp_path: Path, fmt: str, config: Any) -> tuple[Any, ...]:
    """A copy of the model (only q_proj trainable), the export loaded with `datasets`, and
    TRL arguments for two CPU steps."""
    import copy

    from datasets import load_dataset

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    before = _only_q_proj(model)
    dest = tmp_path / fmt
    export(source, fmt, dest)
    ds = load_dataset(str(dest), cache_dir=str(tmp_path / "hf-cache"))
    args = config(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
        max_length=256, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    return model, tokenizer, before, ds, args


def test_trl_sft_trains_on_the_target(smollm2, source: Path, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, before, ds, args = _trl_run(smollm2, source, tmp_path, "trl-sft", SFTConfig)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=ds["train"], processing_class=tokenizer
    )
    row = trainer.train_dataset[0]
    # The loss is on the completion: the labels TRL built are -100 on the whole context and
    # decode to the target (a context-only `messages` column would train on the context).
    target_ids = [t for t in row["labels"] if t != -100]
    assert target_ids, "no completion tokens: the target would never be trained"
    decoded = tokenizer.decode(target_ids)
    assert "here is that change and nothing else" in decoded
    assert decoded.lstrip().startswith("Understood")  # not one context token before it
    out = trainer.train()
    assert out.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 50 for x in losses)
    changed = _changed(model, before)
    assert changed and all("q_proj" in n for n in changed)


def test_trl_dpo_runs_on_the_export(smollm2, source: Path, tmp_path: Path) -> None:
    import copy

    from trl import DPOConfig, DPOTrainer

    model, tokenizer, before, ds, args = _trl_run(smollm2, source, tmp_path, "trl-dpo", DPOConfig)
    # The reference is the starting model itself (TRL would reload it from a path, and a
    # model dequantized from a GGUF has none it can reload).
    ref = copy.deepcopy(model).eval()
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=ds["train"], processing_class=tokenizer
    )
    out = trainer.train()
    assert out.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    # Step 1 starts from the reference weights: DPO loss is ln 2 there, whatever the data.
    assert abs(logs[0]["loss"] - 0.6931) < 0.01
    changed = _changed(model, before)
    assert changed and all("q_proj" in n for n in changed)


def test_the_readme_trl_recipe_runs_as_written(source: Path, tmp_path: Path) -> None:
    """The README's TRL block, verbatim, in a fresh interpreter beside two exports."""
    pytest.importorskip("trl")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme.split("TRL, as tested", 1)[1]
    recipe = after.split("```python\n", 1)[1].split("```", 1)[0]
    assert "SFTTrainer(" in recipe and "DPOTrainer(" in recipe
    export(source, "trl-sft", tmp_path / "exports" / "sft")
    export(source, "trl-dpo", tmp_path / "exports" / "dpo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", recipe],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_runtime" in proc.stdout + proc.stderr
