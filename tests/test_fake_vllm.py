"""The simulated vLLM server: API shapes, the continuous-batching clock, faults.

Timing tests use a tiny profile (few slots, millisecond steps) and assert ratios, so they
take seconds and do not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_vllm import (
    FAULT_KINDS,
    PROFILES,
    Faults,
    Profile,
    SimProcess,
    VLLMSim,
    capacity_tok_s,
)

from dreamgen.scenario import Scenario, UndirectedScenario, response_format

# 8 slots, a step of 4 ms + 0.5 ms per running sequence: 8 ms at a full batch, 1000 tok/s.
TINY = Profile("tiny", slots=8, t0_s=0.004, c_s=0.0005)


def chat_body(model: str | None = "dreamgen-sim", **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "go"}],
        "response_format": response_format("scenario"),
        "temperature": 0.3,
        "top_k": 20,  # vLLM extras are accepted and ignored
        "min_p": 0.0,
        "repetition_penalty": 1.1,
        **kw,
    }
    if model is not None:
        body["model"] = model
    return body


async def post(
    s: aiohttp.ClientSession, sim: VLLMSim, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, Any], Any]:
    async with s.post(
        sim.base_url + "/chat/completions", json=chat_body(**kw), headers=headers
    ) as r:
        return r.status, dict(r.headers), await r.json(loads=orjson.loads)


async def scrape(s: aiohttp.ClientSession, sim: VLLMSim) -> dict[str, float]:
    """/metrics as {sample name (+finished_reason/kind): value}, parsed by prometheus_client."""
    async with s.get(sim.url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            extra = smp.labels.get("finished_reason") or smp.labels.get("kind")
            out[smp.name + (f"/{extra}" if extra else "")] = smp.value
    return out


# ---- timing model ------------------------------------------------------------------------


async def _load(
    s: aiohttp.ClientSession, sim: VLLMSim, workers: int, seconds: float, max_tokens: int
) -> float:
    """Closed-loop load; returns completion tokens received per second, over the time until
    its last request came back (requests sent before the deadline finish after it)."""
    got = 0
    start = time.monotonic()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal got
        while time.monotonic() < deadline:
            _, _, d = await post(s, sim, max_tokens=max_tokens)
            got += d["usage"]["completion_tokens"]

    await asyncio.gather(*(worker() for _ in range(workers)))
    return got / (time.monotonic() - start)


async def test_capacity_is_shared_between_loads() -> None:
    async with VLLMSim(TINY) as sim, aiohttp.ClientSession() as s:
        solo = await _load(s, sim, workers=8, seconds=1.0, max_tokens=8)
        a, b = await asyncio.gather(
            _load(s, sim, workers=8, seconds=1.0, max_tokens=8),
            _load(s, sim, workers=8, seconds=1.0, max_tokens=8),
        )
    # One load that fills the slots gets close to capacity; two share it: together they
    # stay within it, each with a fair part. (Not "together about what one got": with its
    # clients slowed by a busy box one load leaves slots idle that two keep full.) Rates,
    # not token totals: requests sent before the deadline finish after it.
    cap = sim.capacity_tok_s()
    assert 0.6 < solo / cap < 1.05
    assert 0.6 < (a + b) / cap < 1.05
    assert 0.3 < a / (a + b) < 0.7


async def test_requests_beyond_slots_wait_fifo_and_metrics_show_it() -> None:
    queue = Profile("q", slots=4, t0_s=0.004, c_s=0.0005)
    async with VLLMSim(queue) as sim, aiohttp.ClientSession() as s:
        done: list[int] = []

        async def one(i: int) -> None:
            await post(s, sim, max_tokens=40)
            done.append(i)

        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.002)  # arrival order = i
        await asyncio.sleep(0.05)
        m = await scrape(s, sim)
        await asyncio.gather(*tasks)
        after = await scrape(s, sim)
    assert m["vllm:num_requests_running"] == 4
    assert m["vllm:num_requests_waiting"] == 6
    assert m["vllm:kv_cache_usage_perc"] == 1.0
    assert after["vllm:num_requests_waiting"] == 0
    # FIFO admission: the first wave of four finishes before anything admitted later.
    assert sorted(done[:4]) == [0, 1, 2, 3]


async def test_latency_scales_with_tokens() -> None:
    async with VLLMSim(TINY) as sim, aiohttp.ClientSession() as s:
        await post(s, sim, max_tokens=2)  # warm the connection
        t = time.monotonic()
        await post(s, sim, max_tokens=10)
        short = time.monotonic() - t
        t = time.monotonic()
        await post(s, sim, max_tokens=40)
        long = time.monotonic() - t
    assert 2.5 < long / short < 5.5


async def test_prefill_time_per_prompt_token() -> None:
    slow_prefill = Profile("pf", slots=8, t0_s=0.004, c_s=0.0005, prefill_s_per_token=1e-4)
    async with VLLMSim(slow_prefill) as sim, aiohttp.ClientSession() as s:
        await post(s, sim, max_tokens=2)
        t = time.monotonic()
        await post(s, sim, max_tokens=10)
        short = time.monotonic() - t
        long_prompt = [{"role": "user", "content": "word " * 800}]  # ~1000 prompt tokens
        t = time.monotonic()
        await post(s, sim, max_tokens=10, messages=long_prompt)
        long = time.monotonic() - t
    assert long / short > 2  # ~0.1 s of prefill on top of ~45 ms of decoding


async def test_speedup_scales_time() -> None:
    async with VLLMSim(TINY, speedup=4) as sim, aiohttp.ClientSession() as s:
        assert sim.capacity_tok_s() == pytest.approx(4 * capacity_tok_s(TINY))
        await post(s, sim, max_tokens=2)
        t = time.monotonic()
        await post(s, sim, max_tokens=80)
        elapsed = time.monotonic() - t
    assert elapsed < 0.6 * 80 * (TINY.t0_s + TINY.c_s)  # 4x faster than real time, loosely


async def test_disconnect_aborts_and_frees_the_slot() -> None:
    one_slot = Profile("one", slots=1, t0_s=0.004, c_s=0.0005)
    async with VLLMSim(one_slot) as sim, aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            async with s.post(
                sim.base_url + "/chat/completions",
                json=chat_body(max_tokens=1000),  # ~4.5 s of decoding
                timeout=aiohttp.ClientTimeout(total=0.2),
            ) as r:
                await r.read()
        t = time.monotonic()
        status, _, _ = await post(s, sim, max_tokens=5)
        elapsed = time.monotonic() - t
        assert status == 200
        assert elapsed < 0.2 * 1000 * (one_slot.t0_s + one_slot.c_s)
        assert sim.stats()["requests_aborted"] == 1


def test_profile_capacities() -> None:
    assert capacity_tok_s("8b") == pytest.approx(400 / (0.008 + 0.00007 * 400))
    assert 10_500 < capacity_tok_s("8b") < 11_500
    assert 24_000 < capacity_tok_s("1b") < 26_000
    assert math.isinf(capacity_tok_s("stress"))
    assert PROFILES["8b"].slots == 400 and PROFILES["1b"].slots == 1024


# ---- API shape ---------------------------------------------------------------------------


async def test_models_and_wrong_model_404() -> None:
    async with VLLMSim("stress") as sim, aiohttp.ClientSession() as s:
        async with s.get(sim.base_url + "/models") as r:
            models = await r.json()
        status, _, err = await post(s, sim, model="gpt-4")
        no_model_status, _, _ = await post(s, sim, model=None)
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == sim.model and card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["max_model_len"] == PROFILES["stress"].max_model_len
    assert status == 404
    assert err == {
        "error": {
            "message": "The model `gpt-4` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    assert no_model_status == 200  # vLLM serves its model when none is named


async def test_completion_shape_and_content() -> None:
    async with VLLMSim("stress") as sim, aiohttp.ClientSession() as s:
        _, _, d = await post(s, sim)
        _, _, d2 = await post(s, sim)
        _, _, und = await post(
            s, sim, response_format=response_format("scenario_undirected"), seed=7
        )
        _, _, cut = await post(s, sim, max_completion_tokens=30)
    assert d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-")
    assert d["model"] == sim.model and isinstance(d["created"], int)
    choice = d["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    Scenario.model_validate_json(content)
    u = d["usage"]
    assert u["completion_tokens"] == math.ceil(len(content.encode()) / 4)
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert content != d2["choices"][0]["message"]["content"]  # --unique
    UndirectedScenario.model_validate_json(und["choices"][0]["message"]["content"])
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 30
    assert len(cut["choices"][0]["message"]["content"].encode()) <= 120


async def test_not_unique_replays_corpus_round_robin() -> None:
    async with VLLMSim("stress", unique=False) as sim, aiohttp.ClientSession() as s:
        n = len(sim.corpus.items)
        first = (await post(s, sim))[2]["choices"][0]["message"]["content"]
        for _ in range(n - 1):
            await post(s, sim)
        again = (await post(s, sim))[2]["choices"][0]["message"]["content"]
    assert first == again


async def test_context_overflow_is_400() -> None:
    async with VLLMSim("stress") as sim, aiohttp.ClientSession() as s:
        status, _, err = await post(s, sim, max_tokens=10**6)
    assert status == 400 and err["error"]["type"] == "BadRequestError"
    assert "maximum context length" in err["error"]["message"]


async def test_metrics_parse_with_vllm_names() -> None:
    async with VLLMSim(TINY) as sim, aiohttp.ClientSession() as s:
        await asyncio.gather(*(post(s, sim, max_tokens=5) for _ in range(3)))
        async with s.get(sim.url + "/metrics") as r:
            text = await r.text()
        m = await scrape(s, sim)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "sim:batch_fill",
        "sim:busy_slot_steps",
        "sim:slot_steps",
    } <= names
    assert 'model_name="dreamgen-sim"' in text
    assert m["vllm:generation_tokens_total"] == 15
    assert m["vllm:request_success_total/length"] == 3
    assert 0 < m["sim:busy_slot_steps_total"] <= m["sim:slot_steps_total"]


# ---- faults ------------------------------------------------------------------------------


async def test_each_fault_kind_reaches_the_client() -> None:
    faults = Faults(retry_after_s=0.5, stall_s=0.2)
    async with VLLMSim("stress", faults=faults) as sim, aiohttp.ClientSession() as s:

        async def forced(kind: str) -> tuple[int, dict[str, Any], Any]:
            return await post(s, sim, headers={"X-Sim-Fault": kind})

        for kind, code in [("error_500", 500), ("error_502", 502), ("error_503", 503)]:
            status, _, err = await forced(kind)
            assert status == code and err["error"]["code"] == code
        status, headers, err = await forced("rate_limit")
        assert status == 429 and headers["Retry-After"] == "0.5"

        t = time.monotonic()
        status, _, d = await forced("stall")
        assert status == 200 and time.monotonic() - t >= 0.2
        Scenario.model_validate_json(d["choices"][0]["message"]["content"])

        with pytest.raises(TimeoutError):
            async with s.post(
                sim.base_url + "/chat/completions",
                json=chat_body(),
                headers={"X-Sim-Fault": "hang"},
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as r:
                await r.read()

        with pytest.raises(aiohttp.ClientError):  # ServerDisconnected or ClientOSError (RST)
            await forced("reset")

        _, _, d = await forced("truncated")
        assert d["choices"][0]["finish_reason"] == "length"
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(d["choices"][0]["message"]["content"])

        _, _, d = await forced("malformed")
        assert d["choices"][0]["finish_reason"] == "stop"
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(d["choices"][0]["message"]["content"])

        _, _, d = await forced("wrong_schema")
        orjson.loads(d["choices"][0]["message"]["content"])
        with pytest.raises(ValidationError):
            Scenario.model_validate_json(d["choices"][0]["message"]["content"])

        _, _, d = await forced("surrogate")  # valid JSON; the strings it holds are not UTF-8
        text = json.loads(d["choices"][0]["message"]["content"])["opening"]
        assert text.startswith("\ud800")
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(d["choices"][0]["message"]["content"])

        _, _, d = await forced("deep")
        content = d["choices"][0]["message"]["content"]
        assert content.count("[") == 100_000 and d["choices"][0]["finish_reason"] == "stop"

        async with s.get(sim.url + "/sim/stats") as r:
            stats = await r.json()
    assert all(stats["faults"][k] == 1 for k in FAULT_KINDS)


async def test_fault_probabilities_and_runtime_change() -> None:
    sim = VLLMSim("stress", faults={"error_503": 1.0})
    async with sim, aiohttp.ClientSession() as s:
        assert (await post(s, sim))[0] == 503
        async with s.post(sim.url + "/sim/faults", json={"rates": {"rate_limit": 0.5}}) as r:
            assert r.status == 200
        statuses = [(await post(s, sim))[0] for _ in range(200)]
    n429 = statuses.count(429)
    assert 60 < n429 < 140
    assert statuses.count(200) == 200 - n429
    assert sim.stats()["faults"]["rate_limit"] == n429


async def test_outage_switch() -> None:
    async with VLLMSim("stress") as sim, aiohttp.ClientSession() as s:
        sim.set_outage(True)
        async with s.get(sim.url + "/health") as r:
            assert r.status == 503
        assert (await post(s, sim))[0] == 503
        async with s.post(sim.url + "/sim/outage", json={"on": False}) as r:
            assert r.status == 200
        async with s.get(sim.url + "/health") as r:
            assert r.status == 200 and await r.read() == b""
        assert (await post(s, sim))[0] == 200
        assert sim.stats()["faults"]["outage"] == 1


def test_cli_process() -> None:
    with SimProcess("--profile", "stress", "--fault", "error_500=1.0") as sp:
        body = orjson.dumps(chat_body(model=sp.model))

        async def go() -> int:
            url = sp.base_url + "/chat/completions"
            async with aiohttp.ClientSession() as s, s.post(url, data=body) as r:
                return r.status

        assert asyncio.run(go()) == 500
        assert sp.stats()["faults"]["error_500"] == 1
