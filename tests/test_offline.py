"""The offline engine (`vllm.LLM` in-process) up to the vLLM call, and vLLM's absence.

vLLM needs a CUDA host, so a stand-in `vllm` package records what the adapter hands it
(LLM arguments, batched chats, SamplingParams with structured outputs) and answers with
schema-valid scenarios from the simulator's corpus.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dreamgen.config import Config
from dreamgen.engines import EngineError, OfflineEngine, import_vllm
from dreamgen.pipeline import Run
from dreamgen.scenario import response_format

ROOT = Path(__file__).resolve().parent.parent

FAKE_VLLM = textwrap.dedent(
    """
    from types import SimpleNamespace
    from fake_vllm import Corpus

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        instances = []
        fail = False

        def __init__(self, **kw):
            self.kw = kw
            self.calls = []
            self.corpus = Corpus()
            LLM.instances.append(self)

        def chat(self, messages, sampling_params=None, use_tqdm=True):
            self.calls.append((messages, sampling_params, use_tqdm))
            if LLM.fail:
                raise RuntimeError("CUDA out of memory")
            outs = []
            for m in messages:
                text = self.corpus.draw()
                out = SimpleNamespace(text=text, token_ids=[1] * (len(text) // 4),
                                      finish_reason="stop")
                outs.append(SimpleNamespace(prompt_token_ids=[1] * 100, outputs=[out]))
            return outs
    """
)
SAMPLING = textwrap.dedent(
    """
    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json
    """
)
OLD_SAMPLING = textwrap.dedent(
    """
    class GuidedDecodingParams:
        def __init__(self, json=None):
            self.json = json
    """
)


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "sampling_params.py").write_text(SAMPLING)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    for name in ("vllm", "vllm.sampling_params"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import vllm

    yield vllm
    for name in ("vllm", "vllm.sampling_params"):
        sys.modules.pop(name, None)


def offline_config(tmp_path: Path, **kw: Any) -> Config:
    return Config(
        engine="vllm-offline",
        model="Qwen/Qwen3-8B",
        out=tmp_path / "out",
        concurrency=16,
        **kw,
    )


def test_absent_vllm_is_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(EngineError, match=r"needs vLLM.*pip install 'dreamgen\[vllm\]'"):
        import_vllm()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_build_without_vllm_ends_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "offline.toml"
    config.write_text('engine = "vllm-offline"\nmodel = "Qwen/Qwen3-8B"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamgen",
            "build",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'dreamgen[vllm]'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_needs_a_model() -> None:
    with pytest.raises(ValueError, match="vllm-offline' needs the model"):
        Config(engine="vllm-offline")


async def test_offline_run_batches_the_window_with_structured_outputs(
    tmp_path: Path, fake_vllm: Any
) -> None:
    cfg = offline_config(
        tmp_path,
        count=30,
        sampling={"seed": 5, "top_k": 20, "min_p": 0.05},
        offline={
            "tensor_parallel_size": 2,
            "max_model_len": 8192,
            "llm_args": {"enforce_eager": True},
        },
    )
    run = Run(cfg)
    summary = await run.run()
    assert run.store.count == 30 and summary.accepted == 30
    (llm,) = fake_vllm.LLM.instances
    assert llm.kw == {
        "model": "Qwen/Qwen3-8B",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "dtype": "auto",
        "max_model_len": 8192,
        "seed": 5,
        "enforce_eager": True,
    }
    # The engine saw the whole window (16) at once, not one request at a time.
    sizes = [len(messages) for messages, _, _ in llm.calls]
    assert max(sizes) == 16 and sum(sizes) == summary.requests
    assert len(sizes) <= summary.requests / 4
    # vLLM (offline too) gets the schema without string lengths (xgrammar is faster).
    schema = response_format("scenario", "unbounded")["json_schema"]["schema"]
    guided = set()
    for messages, params, use_tqdm in llm.calls:
        assert use_tqdm is False and len(params) == len(messages)
        for p in params:
            assert p.kw["temperature"] == 0.3 and p.kw["max_tokens"] == 1200
            assert p.kw["top_k"] == 20 and p.kw["min_p"] == 0.05
            assert p.kw["repetition_penalty"] == 1.1 and "repeat_penalty" not in p.kw
            assert p.kw["seed"] >= 5
            assert p.kw["structured_outputs"].json == schema
            guided.add(id(p.kw["structured_outputs"]))
    assert len(guided) == 1  # one structured-outputs object per schema, reused
    for record in run.store.records():
        assert record.provenance.engine == "vllm-offline"
        assert record.provenance.model == "Qwen/Qwen3-8B"


async def test_older_vllm_gets_guided_decoding(
    tmp_path: Path, fake_vllm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (Path(fake_vllm.__file__).parent / "sampling_params.py").write_text(OLD_SAMPLING)
    monkeypatch.delitem(sys.modules, "vllm.sampling_params", raising=False)
    engine = OfflineEngine(offline_config(tmp_path))
    await engine.start()
    try:
        p = engine.sampling_params({"temperature": 0.1}, response_format("scenario"))
        assert "structured_outputs" not in p.kw
        assert p.kw["guided_decoding"].json == response_format("scenario")["json_schema"]["schema"]
    finally:
        await engine.close()


async def test_a_failed_batch_fails_its_requests_not_the_engine(
    tmp_path: Path, fake_vllm: Any
) -> None:
    engine = OfflineEngine(offline_config(tmp_path))
    await engine.start()
    try:
        fake_vllm.LLM.fail = True
        with pytest.raises(EngineError, match="CUDA out of memory"):
            await engine.chat([{"role": "user", "content": "hi"}])
        fake_vllm.LLM.fail = False
        c = await engine.chat([{"role": "user", "content": "hi"}])
        assert c.finish_reason == "stop" and c.prompt_tokens == 100 and c.completion_tokens > 0
    finally:
        fake_vllm.LLM.fail = False
        await engine.close()
