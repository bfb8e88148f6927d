"""A GGUF loaded by ``load_model`` is a plain float model the HF stack takes as it is."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dreamgen.training import ModelLoadError, load_model  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_dequantized_gguf_is_plain(smollm2):
    model, _ = smollm2
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "eager"


def test_trainer_accepts_it_and_steps(smollm2, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tokenizer = smollm2
    ids = tokenizer("Only fix the typo, nothing else.", return_tensors="pt")["input_ids"][0]
    rows = [{"input_ids": ids, "labels": ids}] * 2
    for name, param in model.named_parameters():
        param.requires_grad = name == "model.layers.0.self_attn.q_proj.weight"
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=1,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    after = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(before, after)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(before)
    for param in model.parameters():
        param.requires_grad = False


def test_save_pretrained_round_trips(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = smollm2
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    mine = dict(model.named_parameters())
    for name, param in again.named_parameters():
        assert torch.equal(param, mine[name]), name


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
def test_peft_wraps_it(smollm2):
    from peft import LoraConfig, get_peft_model

    model, _ = smollm2
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("q_proj.lora_" in n for n in trainable)
    wrapped.unload()  # leave the module's model as it was


def test_unloadable_models_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in (tmp_path / "missing.gguf", tmp_path / "empty"):
        with pytest.raises(ModelLoadError) as err:
            load_model(name)
        assert "\n" not in str(err.value) and str(name) in str(err.value)
