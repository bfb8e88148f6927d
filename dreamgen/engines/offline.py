"""``engine = "vllm-offline"``: vLLM's in-process engine (``vllm.LLM``) for batch builds.

A thin adapter. The pipeline keeps its usual window of requests in flight; here they are
gathered into one ``LLM.chat`` call per wave, so vLLM schedules the whole plan window at
once, with structured outputs (JSON schema) per request. vLLM is an optional extra
(``pip install 'dreamgen[vllm]'`` on a CUDA host), imported only when this engine starts;
without it the run ends with one clear line.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dreamgen.engines.base import Completion, Engine, EngineError

if TYPE_CHECKING:
    from dreamgen.config import Config

# The log name predates this package; log queries match on it.
log = logging.getLogger("dreamgen.offline")

# Sampling fields vLLM's SamplingParams takes under the same name; the rest are dropped
# (``repeat_penalty`` is llama.cpp's spelling of ``repetition_penalty``).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed",
                   "repetition_penalty", "presence_penalty", "frequency_penalty")  # fmt: skip

MISSING = (
    "engine 'vllm-offline' needs vLLM, which is not installed: pip install 'dreamgen[vllm]' "
    "on a CUDA host (or serve the model with `vllm serve` and use engine 'openai')"
)


def import_vllm() -> ModuleType:
    """Import vllm, or raise EngineError with the one line that says what to do."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise EngineError(MISSING) from exc


@dataclass(eq=False)
class _Pending:
    messages: list[dict[str, str]]
    params: Any
    future: asyncio.Future[Completion]
    t0: float


class OfflineEngine(Engine):
    """``vllm.LLM`` behind the pipeline's engine interface, batching the in-flight window."""

    name = "vllm-offline"
    schema_dialect = "unbounded"  # vLLM's xgrammar: bounds enforced after, by pydantic
    ready: bool = False  # True between start and close

    def __init__(self, config: Config, *, batch_wait_s: float = 0.05) -> None:
        self.model = config.model_name
        self.config = config
        self.batch_wait_s = batch_wait_s
        self.max_batch = config.concurrency
        self._vllm: ModuleType | None = None
        self._llm: Any = None
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._guided: dict[str, Any] = {}  # one structured-outputs object per schema

    def llm_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``vllm.LLM`` gets, from ``[offline]`` in the config."""
        o = self.config.offline
        kw: dict[str, Any] = {
            "model": self.model,
            "tensor_parallel_size": o.tensor_parallel_size,
            "gpu_memory_utilization": o.gpu_memory_utilization,
            "dtype": o.dtype,
        }
        if o.max_model_len is not None:
            kw["max_model_len"] = o.max_model_len
        if self.config.sampling.seed is not None:
            kw["seed"] = self.config.sampling.seed
        kw.update(o.llm_args)
        return kw

    async def start(self) -> None:
        self._vllm = import_vllm()
        log.info("loading %s into vLLM (offline engine)", self.model)
        try:
            self._llm = await asyncio.to_thread(self._vllm.LLM, **self.llm_kwargs())
        except Exception as exc:  # vLLM raises many kinds; the user needs one line
            raise EngineError(f"vLLM could not load {self.model!r}: {exc}") from exc
        self.ready = True
        self._task = asyncio.create_task(self._batcher())

    async def close(self) -> None:
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for p in self._queue:
            if not p.future.done():
                p.future.cancel()
        self._queue.clear()
        self._llm = None

    # -- requests ------------------------------------------------------------------------

    def sampling_params(
        self, sampling: dict[str, Any] | None, response_format: dict[str, Any] | None
    ) -> Any:
        """vLLM SamplingParams for one request, with structured outputs for its schema."""
        assert self._vllm is not None
        kw = {k: v for k, v in (sampling or {}).items() if k in SAMPLING_FIELDS}
        if response_format is not None:
            spec = response_format.get("json_schema") or {}
            name = str(spec.get("name", "schema"))
            if name not in self._guided:
                self._guided[name] = self._structured(spec.get("schema", {}))
            field, value = self._guided[name]
            kw[field] = value
        return self._vllm.SamplingParams(**kw)

    def _structured(self, schema: dict[str, Any]) -> tuple[str, Any]:
        """vLLM >= 0.10.2: StructuredOutputsParams; older: GuidedDecodingParams."""
        sp = importlib.import_module("vllm.sampling_params")
        if hasattr(sp, "StructuredOutputsParams"):
            return "structured_outputs", sp.StructuredOutputsParams(json=schema)
        return "guided_decoding", sp.GuidedDecodingParams(json=schema)

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        if self._llm is None:
            raise EngineError("the offline engine is not started")
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        params = self.sampling_params(sampling, response_format)
        self._queue.append(_Pending(messages, params, future, time.perf_counter()))
        self._wake.set()
        return await future

    async def _batcher(self) -> None:
        while True:
            await self._wake.wait()
            # Let the pipeline fill its window before the wave starts: wait while requests
            # keep arriving (a gap of batch_wait_s ends it), up to the window size.
            while len(self._queue) < self.max_batch:
                seen = len(self._queue)
                await asyncio.sleep(self.batch_wait_s)
                if len(self._queue) == seen:
                    break
            self._wake.clear()
            batch = [p for p in self._queue[: self.max_batch] if not p.future.done()]
            del self._queue[: self.max_batch]
            if self._queue:
                self._wake.set()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            outputs = await asyncio.to_thread(
                self._llm.chat,
                [p.messages for p in batch],
                sampling_params=[p.params for p in batch],
                use_tqdm=False,
            )
        except Exception as exc:  # one failed wave fails its requests, not the run
            err = EngineError(f"vLLM failed a batch of {len(batch)}: {exc}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        now = time.perf_counter()
        for p, out in zip(batch, outputs, strict=False):
            if p.future.done():
                continue
            try:
                p.future.set_result(_completion(out, now - p.t0))
            except (AttributeError, IndexError, TypeError) as exc:
                p.future.set_exception(EngineError(f"unexpected vLLM output: {exc}"))
        for p in batch[len(outputs) :]:
            if not p.future.done():
                p.future.set_exception(EngineError("vLLM returned fewer outputs than prompts"))


def _completion(out: Any, latency_s: float) -> Completion:
    """A vLLM RequestOutput reduced to what the pipeline uses."""
    first = out.outputs[0]
    return Completion(
        content=first.text,
        finish_reason=first.finish_reason or "",
        prompt_tokens=len(out.prompt_token_ids or []),
        completion_tokens=len(first.token_ids or []),
        latency_s=latency_s,
    )
