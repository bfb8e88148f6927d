"""A simulated vLLM server: vLLM's OpenAI-compatible API with a continuous-batching clock.

Test infrastructure: the one test double the suite uses, standing in for the GPU vLLM
server that cannot run here. ``bench/`` drives it too (``from tests.fake_vllm import …``).

It lets tests and benchmarks drive dreamgen's client at GPU-server scale without a GPU:

- API (shapes checked against vLLM's ``entrypoints/openai`` code): ``POST /v1/chat/completions``
  (non-streaming), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (vLLM's metric
  names), plus ``/sim/stats``, ``/sim/outage`` and ``/sim/faults`` for control.
- Timing: one engine loop; a step over ``B`` running sequences takes ``t0 + c*B`` (plus
  prefill for sequences admitted that step) and emits one token per running sequence;
  FIFO admission up to ``slots``, the rest wait; a response is sent when its last token
  is produced. ``speedup`` divides every engine time so tests run the model fast.
- Content: schema-valid scenario JSON replayed from a corpus written by a real model
  (``bench/make_corpus.py``); completion tokens = ceil(bytes/4), capped by ``max_tokens``.
- Judge: a request with the ``judge`` schema (``dreamgen.judge``) gets a judge answer
  computed from the prompt's own text by plain heuristics (``judge_answer``), not from
  any labels: it picks the response sharing more words with the cue quotes, says a quote
  carries direction / is the assistant's idea when it occurs in a user / assistant turn,
  guesses a cue kind from keywords, coherence 4 (2 if a turn is empty), difficulty from
  the number of user turns. ``judge="always_a"`` always answers "A" (a position-biased
  judge); ``judge="malformed"`` answers broken JSON.
- Faults: 5xx, 429 + Retry-After, stalls, hangs, connection resets, truncated, malformed
  and wrong-schema content, and an outage switch. Drawn per request by probability, or
  forced per request with the ``X-Sim-Fault: <kind>`` header (deterministic tests).

    python tests/fake_vllm.py --profile 8b --port 8000 --fault error_503=0.01

In-process (same event loop as the caller; use a separate process, ``SimProcess``, when
measuring a client's own CPU ceiling)::

    async with VLLMSim("8b", speedup=10) as sim:
        ...  # sim.base_url, sim.model, sim.stats(), sim.set_outage(True)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import math
import random
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make the dreamgen package importable
    sys.path.insert(0, str(_ROOT))

from dreamgen.scenario import Scenario  # noqa: E402
from dreamgen.taxonomy import Domain, Emotion, Momentum  # noqa: E402

DEFAULT_CORPUS = _ROOT / "bench" / "corpus" / "scenarios.jsonl"
DEFAULT_MODEL = "dreamgen-sim"
BYTES_PER_TOKEN = 4
# Behind schedule by more than this, the engine clock forgets the debt instead of bursting:
# a real GPU does not "catch up" after the API server was busy.
MAX_LAG_S = 0.25


@dataclass(frozen=True)
class Profile:
    """Timing model of one served model: a step over B sequences takes ``t0_s + c_s*B``."""

    name: str
    slots: int
    t0_s: float
    c_s: float
    prefill_s_per_token: float = 0.0
    max_model_len: int = 16384

    @property
    def zero_latency(self) -> bool:
        """True for the stress profile: answers at once, to find the client's own ceiling."""
        return self.t0_s == 0 and self.c_s == 0 and self.prefill_s_per_token == 0


PROFILES: dict[str, Profile] = {
    # 8B bf16 on one H100: KV room for ~400 sequences; ~11k tok/s at a full batch.
    "8b": Profile("8b", slots=400, t0_s=0.008, c_s=0.00007),
    # <=1B model: vLLM's max_num_seqs cap of 1024 binds first; ~25k tok/s at a full batch.
    "1b": Profile("1b", slots=1024, t0_s=0.020, c_s=0.00002),
    "stress": Profile("stress", slots=1_000_000, t0_s=0.0, c_s=0.0),
}


def capacity_tok_s(profile: str | Profile, speedup: float = 1.0) -> float:
    """Decode tokens/s at a full batch: slots / (t0 + c*slots); inf for zero latency."""
    p = PROFILES[profile] if isinstance(profile, str) else profile
    step = p.t0_s + p.c_s * p.slots
    return math.inf if step == 0 else speedup * p.slots / step


# ---------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------

ERROR_STATUS = {"error_500": 500, "error_502": 502, "error_503": 503, "rate_limit": 429}
FAULT_KINDS = (
    *ERROR_STATUS,
    "stall",  # hold stall_s, then answer normally
    "hang",  # never answer; the client must time out
    "reset",  # generate, then reset the connection (RST) without a response
    "truncated",  # finish_reason "length", content cut mid-JSON
    "malformed",  # finish_reason "stop", content not valid JSON
    "wrong_schema",  # valid JSON, required fields missing
    "surrogate",  # valid JSON whose strings hold lone UTF-16 surrogates (escaped)
    "deep",  # a JSON array nested 100,000 deep (sent whatever max_tokens says)
)


@dataclass
class Faults:
    """Per-request fault probabilities by kind (at most one fault per request)."""

    rates: dict[str, float] = field(default_factory=dict)
    retry_after_s: float = 1.0
    stall_s: float = 2.0

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if sum(self.rates.values()) > 1.0:
            raise ValueError("fault probabilities sum to more than 1")

    def pick(self, rng: random.Random) -> str | None:
        """Draw this request's fault, or None; one uniform draw over the cumulative rates."""
        if not self.rates:
            return None
        u = rng.random()
        for kind, p in self.rates.items():
            if u < p:
                return kind
            u -= p
        return None


def parse_fault_flags(flags: list[str]) -> dict[str, float]:
    """``["error_503=0.01", "reset=0.001"]`` → ``{"error_503": 0.01, "reset": 0.001}``."""
    rates: dict[str, float] = {}
    for flag in flags:
        kind, _, p = flag.partition("=")
        rates[kind.strip()] = float(p)
    return rates


# ---------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------


class Corpus:
    """Scenario JSON replayed from a JSONL corpus written by a real model.

    With ``unique`` (default) each draw recombines parts of different corpus scenarios
    (opening + exchanges, idea turn, decision turn, listening, reflex) and tags the
    opening with the request number, so downstream exact *and* near-duplicate (MinHash)
    dedup sees distinct records — one appended word alone would still be a near-duplicate.
    Without it, scenarios are returned verbatim round-robin.
    """

    def __init__(self, path: Path = DEFAULT_CORPUS, *, unique: bool = True, seed: int = 0):
        lines = [ln for ln in Path(path).read_bytes().splitlines() if ln.strip()]
        # Validate once at load: the sim must never serve content the real schema rejects.
        self.items = [Scenario.model_validate_json(ln).model_dump() for ln in lines]
        if not self.items:
            raise ValueError(f"empty corpus: {path}")
        self.unique = unique
        self.rng = random.Random(seed)
        self.counter = itertools.count()

    def draw(self, undirected: bool = False) -> str:
        """One scenario as compact JSON; with the undirected axes when asked for."""
        i = next(self.counter)
        d = self._mix(i) if self.unique else dict(self.items[i % len(self.items)])
        if undirected:
            r = self.rng
            d["domain"] = r.choice(list(Domain)).value
            d["emotion"] = r.choice(list(Emotion)).value
            d["momentum"] = r.choice(list(Momentum)).value
            d["difficulty"] = r.randint(1, 5)
        return orjson.dumps(d).decode()

    def _mix(self, i: int) -> dict[str, Any]:
        r, items = self.rng, self.items
        base = r.choice(items)  # opening + exchanges + extra quotes stay together
        tag = f" ref{i}"
        d = {
            "opening": base["opening"][: 400 - len(tag)] + tag,
            "exchanges": base["exchanges"],
            "idea_turn": r.choice(items)["idea_turn"],
            "decision_turn": r.choice(items)["decision_turn"],
            "extra_cues": [],
            "extra_distractors": [],
            "listening": r.choice(items)["listening"],
            "reflex": r.choice(items)["reflex"],
        }
        # Keep only the extra quotes still found in the turn they point at after mixing.
        turns = [d["opening"]]
        for ex in d["exchanges"]:
            turns += [ex["assistant"], ex["user"]]
        it, dt = d["idea_turn"], d["decision_turn"]
        turns += [it["before"] + it["idea"] + it["after"], dt["before"] + dt["cue"] + dt["after"]]
        for key in ("extra_cues", "extra_distractors"):
            for q in base[key]:
                t = q["turn"]
                text = d["reflex"] if t == -1 else (turns[t] if t < len(turns) else "")
                if q["quote"] in text:
                    d[key].append(q)
        return d


JUDGE_MODES = ("heuristic", "always_a", "malformed")
_KIND_WORDS = (  # first match wins; the cue kinds of dreamgen.taxonomy
    ("prior_decision", ("we decided", "we agreed", "already", "as planned", "we said")),
    ("correction", ("not ", "wrong", "actually", "instead")),
    ("scope_limit", ("only", "just ", "nothing else", "no more")),
    ("constraint", ("must", "can't", "cannot", "without", "deadline", "budget")),
    ("preference", ("prefer", "i like", "rather", "i'd like")),
)
_PROBLEM_WORDS = ("careful", "risk", "warning", "mistake", "note that", "be aware", "wrong")


def _words(text: str) -> set[str]:
    cleaned = "".join(c.lower() if c.isalnum() else " " for c in text)
    return {w for w in cleaned.split() if len(w) > 3}


_TURN = re.compile(r"^\[\d+\] (user|assistant|system): ", re.MULTILINE)
_QUOTE = re.compile(r'^([CD])\d+: (".*")$', re.MULTILINE)


def _cue_kind(quote: str) -> str:
    q = quote.lower()
    hit = (kind for kind, words in _KIND_WORDS if any(w in q for w in words))
    return next(hit, "explicit_instruction")


def judge_answer(prompt: str, mode: str = "heuristic") -> str:
    """A judge-schema answer derived from the judge prompt's text (see the module doc)."""
    talk, _, section = prompt.partition("\n\nTwo candidate assistant replies")
    a, _, rest = section.partition("Response A:\n")[2].partition("\n\nResponse B:\n")
    b = rest.split("\n\nQuotes from user turns", 1)[0]
    parts = _TURN.split(talk)[1:]  # role, content, role, content, ...
    turns = list(zip(parts[::2], parts[1::2], strict=True))
    user = "\n".join(c for r, c in turns if r == "user")
    assistant = "\n".join(c for r, c in turns if r == "assistant")
    quotes = [(m[1], orjson.loads(m[2])) for m in _QUOTE.finditer(section)]
    cues = [q for tag, q in quotes if tag == "C"]
    dis = [q for tag, q in quotes if tag == "D"]
    cue_words = set().union(*map(_words, cues))
    score_a, score_b = len(_words(a) & cue_words), len(_words(b) & cue_words)
    # Ties break on the texts themselves, never on which came first: an honest judge.
    follows = "A" if (score_a, b) > (score_b, a) else "B"
    named = (
        any(w in a.lower() for w in _PROBLEM_WORDS),
        any(w in b.lower() for w in _PROBLEM_WORDS),
    )
    coherent = a.strip() and b.strip() and all(c.strip() for _, c in turns)
    answer = {
        "follows": "A" if mode == "always_a" else follows,
        "cues": [{"direction": q in user, "kind": _cue_kind(q)} for q in cues],
        "distractors": [{"own_idea": q in assistant} for q in dis],
        "coherence": 4 if coherent else 2,
        "difficulty": max(1, min(5, sum(r == "user" for r, _ in turns))),
        "names_problem": {(True, True): "both", (True, False): "A", (False, True): "B"}.get(
            named, "neither"
        ),
    }
    content = orjson.dumps(answer).decode()
    return _malformed(content) if mode == "malformed" else content


def _malformed(content: str) -> str:
    """Not JSON: a trailing comma before the closing brace, as a sloppy model writes."""
    return content[:-1] + ",}"


def _wrong_schema(content: str) -> str:
    """Valid JSON that misses required fields."""
    d = orjson.loads(content)
    for key in ("decision_turn", "listening"):
        d.pop(key, None)
    return orjson.dumps(d).decode()


# ---------------------------------------------------------------------------------------
# Engine: continuous batching
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Seq:
    tokens: int
    prompt_tokens: int
    fut: asyncio.Future[None]
    state: str = "waiting"  # waiting | running | done | aborted
    finish_step: int = 0


class Engine:
    """One loop stepping every running sequence a token at a time, like vLLM's scheduler."""

    def __init__(self, profile: Profile, speedup: float = 1.0, slots: int | None = None):
        self.profile = profile
        self.slots = slots or profile.slots
        self.speedup = speedup
        self.waiting: deque[_Seq] = deque()
        self.n_running = 0
        self._heap: list[tuple[int, int, _Seq]] = []  # (finish step, tiebreak, seq)
        self._ids = itertools.count()
        self.step = 0
        self.tokens_generated = 0
        self.busy_slot_steps = 0
        self.prompt_tokens = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the step loop (not needed for a zero-latency profile)."""
        if not self.profile.zero_latency:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the step loop."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def generate(self, tokens: int, prompt_tokens: int) -> None:
        """Return when a sequence of ``tokens`` output tokens has been fully decoded.

        Cancellation (the client went away) aborts it and frees its slot, as vLLM does.
        """
        if self.profile.zero_latency:
            self.tokens_generated += tokens  # no steps, so no slot-steps either
            self.prompt_tokens += prompt_tokens
            return
        seq = _Seq(tokens, prompt_tokens, asyncio.get_running_loop().create_future())
        self.waiting.append(seq)
        self._wake.set()
        try:
            await seq.fut
        except asyncio.CancelledError:
            self._abort(seq)
            raise

    def _abort(self, seq: _Seq) -> None:
        if seq.state == "waiting":
            self.waiting.remove(seq)
        elif seq.state == "running":
            self.n_running -= 1  # its heap entry is skipped when it comes up
        seq.state = "aborted"

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        p = self.profile
        t_next = loop.time()
        while True:
            if self.n_running == 0 and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                t_next = loop.time()
            # FIFO admission at the step boundary, up to the slot count.
            prefill = 0
            while self.waiting and self.n_running < self.slots:
                seq = self.waiting.popleft()
                seq.state = "running"
                seq.finish_step = self.step + seq.tokens
                heapq.heappush(self._heap, (seq.finish_step, next(self._ids), seq))
                self.n_running += 1
                prefill += seq.prompt_tokens
            self.prompt_tokens += prefill
            dt = (p.t0_s + p.c_s * self.n_running + p.prefill_s_per_token * prefill) / self.speedup
            # Absolute deadlines: sleep overshoot on one step is repaid on the next.
            t_next = max(t_next + dt, loop.time() - MAX_LAG_S)
            await asyncio.sleep(max(0.0, t_next - loop.time()))
            self.step += 1
            # Sequences aborted during the step produced nothing this step.
            self.tokens_generated += self.n_running
            self.busy_slot_steps += self.n_running
            heap = self._heap
            while heap and heap[0][0] <= self.step:
                seq = heapq.heappop(heap)[2]
                if seq.state != "running":
                    continue
                seq.state = "done"
                self.n_running -= 1
                if not seq.fut.done():
                    seq.fut.set_result(None)


# ---------------------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------------------


def _error(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    """vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _prompt_tokens(messages: list[Any]) -> int:
    """Tokenizer-free estimate: ~4 characters per token plus a few template tokens a turn."""
    chars = 0
    for m in messages:
        c = m.get("content", "") if isinstance(m, dict) else ""
        chars += len(c) if isinstance(c, str) else len(orjson.dumps(c))
    return math.ceil(chars / BYTES_PER_TOKEN) + 4 * len(messages)


class VLLMSim:
    """The simulated server; ``async with VLLMSim(...) as sim`` or ``start()``/``stop()``.

    ``profile``: a name in PROFILES or a Profile; ``model``: the served name (requests
    naming another get vLLM's 404; naming none get this one); ``port`` 0 binds an ephemeral
    port (``sim.port`` after start); ``speedup`` divides engine time; ``slots`` overrides
    max_num_seqs; ``unique``: vary content per request (see Corpus); ``faults``: kind →
    probability; ``seed`` fixes content and fault draws. The request's own ``seed`` and
    sampling fields are accepted and ignored, as are vLLM extras (top_k, min_p, ...).
    """

    def __init__(
        self,
        profile: str | Profile = "8b",
        *,
        model: str = DEFAULT_MODEL,
        host: str = "127.0.0.1",
        port: int = 0,
        speedup: float = 1.0,
        slots: int | None = None,
        corpus: Path | str = DEFAULT_CORPUS,
        unique: bool = True,
        faults: Faults | dict[str, float] | None = None,
        seed: int = 0,
        judge: str = "heuristic",
    ):
        if judge not in JUDGE_MODES:
            raise ValueError(f"unknown judge mode {judge!r}; known: {JUDGE_MODES}")
        self.judge = judge
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.model = model
        self.host = host
        self.port = port
        self.engine_args = (self.profile, speedup, slots)
        self.corpus = Corpus(Path(corpus), unique=unique, seed=seed)
        self.faults = faults if isinstance(faults, Faults) else Faults(dict(faults or {}))
        self.rng = random.Random(seed + 1)
        self.outage = False
        self.fault_counts: dict[str, int] = dict.fromkeys((*FAULT_KINDS, "outage"), 0)
        self.finished: dict[str, int] = {"stop": 0, "length": 0}
        self.requests_received = 0
        self.requests_aborted = 0
        self.started_at = time.monotonic()
        self._ids = itertools.count()
        self._runner: web.AppRunner | None = None
        self.engine: Engine | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_SimCollector(self))

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> VLLMSim:
        """Bind and start serving; ``self.port`` is the bound port afterwards."""
        self.engine = Engine(*self.engine_args)
        self.engine.start()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._chat),
                web.get("/v1/models", self._models),
                web.get("/health", self._health),
                web.get("/metrics", self._metrics),
                web.get("/version", self._version),
                web.get("/sim/stats", self._sim_stats),
                web.post("/sim/outage", self._sim_outage),
                web.post("/sim/faults", self._sim_faults),
            ]
        )
        # handler_cancellation: a client that disconnects aborts its request and frees the
        # slot (vLLM aborts on disconnect). No access log: it would cost more than the sim.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.started_at = time.monotonic()
        return self

    async def stop(self) -> None:
        """Stop serving and the engine loop."""
        if self._runner:
            await self._runner.cleanup()
        if self.engine:
            await self.engine.stop()

    async def __aenter__(self) -> VLLMSim:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        return self.url + "/v1"

    # ---- control API -----------------------------------------------------------------

    def set_outage(self, on: bool) -> None:
        """While on, every request and /health answer 503."""
        self.outage = on

    def set_faults(self, rates: dict[str, float], **kw: float) -> None:
        """Replace the fault probabilities (kw: retry_after_s, stall_s)."""
        self.faults = Faults(dict(rates), **kw)

    def capacity_tok_s(self) -> float:
        """This instance's theoretical full-batch decode rate (speedup and slots included)."""
        assert self.engine is not None
        p = self.profile
        step = p.t0_s + p.c_s * self.engine.slots
        return math.inf if step == 0 else self.engine.speedup * self.engine.slots / step

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks: tokens, steps, busy slot-steps, fill, faults, requests."""
        e = self.engine
        assert e is not None
        slot_steps = e.step * e.slots
        return {
            "profile": self.profile.name,
            "model": self.model,
            "slots": e.slots,
            "speedup": e.speedup,
            "capacity_tok_s": self.capacity_tok_s(),
            "uptime_s": time.monotonic() - self.started_at,
            "running": e.n_running,
            "waiting": len(e.waiting),
            "steps": e.step,
            "tokens_generated": e.tokens_generated,
            "prompt_tokens": e.prompt_tokens,
            "busy_slot_steps": e.busy_slot_steps,
            "avg_fill": e.busy_slot_steps / slot_steps if slot_steps else 0.0,
            "requests_received": self.requests_received,
            "requests_finished": dict(self.finished),
            "requests_aborted": self.requests_aborted,
            "faults": dict(self.fault_counts),
            "outage": self.outage,
        }

    # ---- handlers --------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests_received += 1
        if self.outage:
            self.fault_counts["outage"] += 1
            return _error(503, "Service is in an injected outage.", "ServiceUnavailableError")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            return _error(400, f"Invalid JSON body: {e}", "BadRequestError")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list", "BadRequestError", "messages")
        model = body.get("model")
        if model and model != self.model:  # vLLM: no model name means the served one
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

        fault = request.headers.get("X-Sim-Fault") or self.faults.pick(self.rng)
        if fault:
            if fault not in self.fault_counts:
                return _error(400, f"unknown X-Sim-Fault {fault!r}", "BadRequestError")
            self.fault_counts[fault] += 1
        if fault in ERROR_STATUS:
            return self._fault_error(fault)

        prompt_tokens = _prompt_tokens(messages)
        max_len = self.profile.max_model_len
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            return _error(400, "max_tokens must be at least 1", "BadRequestError", "max_tokens")
        if prompt_tokens + (max_tokens or 0) > max_len:
            return _error(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                "BadRequestError",
                "max_tokens",
            )
        if max_tokens is None:
            max_tokens = max_len - prompt_tokens  # vLLM's default: the rest of the context

        rf = body.get("response_format") or {}
        schema_name = (rf.get("json_schema") or {}).get("name") if isinstance(rf, dict) else None
        if schema_name == "judge":
            prompt = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
            content = judge_answer(str(prompt), self.judge)
        else:
            content = self.corpus.draw(undirected=schema_name == "scenario_undirected")
        finish = "stop"
        if fault == "malformed":
            content = _malformed(content)
        elif fault == "wrong_schema":
            content = _wrong_schema(content)
        elif fault == "truncated":
            content, finish = content[: len(content) // 2], "length"
        data = content.encode()
        tokens = max(1, math.ceil(len(data) / BYTES_PER_TOKEN))
        if tokens > max_tokens:
            content = data[: max_tokens * BYTES_PER_TOKEN].decode(errors="ignore")
            tokens, finish = max_tokens, "length"

        if fault == "surrogate":  # `\ud800` is valid JSON; the str it decodes to is not UTF-8
            content = content.replace('":"', '":"\\ud800', 3)
        elif fault == "deep":  # a hostile server: no max_tokens clamp
            content = '{"exchanges":' + "[" * 100_000 + "]" * 100_000 + "}"
            tokens, finish = 64, "stop"

        try:
            if fault == "stall":
                await asyncio.sleep(self.faults.stall_s)
            elif fault == "hang":
                await asyncio.Event().wait()  # until the client gives up (handler cancelled)
            assert self.engine is not None
            await self.engine.generate(tokens, prompt_tokens)
        except asyncio.CancelledError:
            self.requests_aborted += 1
            raise
        if fault == "reset":
            return await self._reset(request)
        self.finished[finish] += 1
        return web.Response(
            body=orjson.dumps(self._completion(content, finish, prompt_tokens, tokens)),
            content_type="application/json",
        )

    def _completion(
        self, content: str, finish: str, prompt_tokens: int, tokens: int
    ) -> dict[str, Any]:
        """vLLM's ChatCompletionResponse, field for field (non-streaming)."""
        return {
            "id": f"chatcmpl-{next(self._ids):08x}{self.rng.getrandbits(64):016x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": content,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + tokens,
                "completion_tokens": tokens,
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }

    def _fault_error(self, fault: str) -> web.Response:
        status = ERROR_STATUS[fault]
        if status == 429:
            resp = _error(429, "Too many requests (injected).", "RateLimitError")
            resp.headers["Retry-After"] = f"{self.faults.retry_after_s:g}"
            return resp
        kinds = {500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailableError"}
        return _error(status, f"Injected {status} error.", kinds[status])

    async def _reset(self, request: web.Request) -> web.Response:
        """Reset the connection (SO_LINGER 0 → RST), as a crashed server or a proxy does."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        await asyncio.sleep(3600)  # connection_lost cancels this handler first
        return web.Response(status=500)

    async def _models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        card = {
            "id": self.model,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.profile.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{self.rng.getrandbits(64):016x}",
                    "object": "model_permission",
                    "created": now,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return web.json_response({"object": "list", "data": [card]}, dumps=_dumps)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.outage else 200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0+sim"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=_dumps)

    async def _sim_outage(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read() or b"{}")
        self.set_outage(bool(body.get("on", True)))
        return web.json_response({"outage": self.outage})

    async def _sim_faults(self, request: web.Request) -> web.Response:
        """Body: {"rates": {kind: p}, "retry_after_s": .., "stall_s": ..}."""
        body = orjson.loads(await request.read() or b"{}")
        try:
            kw = {k: v for k, v in body.items() if k != "rates"}
            self.set_faults(body.get("rates", {}), **kw)
        except (ValueError, TypeError) as e:
            return _error(400, str(e), "BadRequestError")
        return web.json_response({"rates": self.faults.rates})


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class _SimCollector(Collector):
    """vLLM's metric names (v1 PrometheusStatLogger), read from the sim's counters at scrape."""

    def __init__(self, sim: VLLMSim):
        self.sim = sim

    def collect(self) -> Iterator[Metric]:
        s = self.sim.stats()
        labels, lv = ["model_name", "engine"], [self.sim.model, "0"]
        usage = s["running"] / s["slots"]  # KV use tracks the running share of slots

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(lv, value)
            return c

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.",
            s["running"],
        )  # fmt: skip
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
            s["waiting"],
        )  # fmt: skip
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: use "
            "vllm:kv_cache_usage_perc.",
            usage,
        )
        yield counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", s["prompt_tokens"]
        )
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.",
            s["tokens_generated"],
        )  # fmt: skip
        ok = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        for reason, n in s["requests_finished"].items():
            ok.add_metric([*lv, reason], n)
        yield ok
        # Sim-only: average fill = busy_slot_steps / slot_steps over any window.
        yield gauge("sim:batch_fill", "Running sequences / slots, now.", usage)
        yield gauge("sim:slots", "Slot count (max_num_seqs).", s["slots"])
        yield counter("sim:engine_steps", "Engine steps taken.", s["steps"])
        yield counter("sim:busy_slot_steps", "Sum over steps of running sequences.",
                      s["busy_slot_steps"])  # fmt: skip
        yield counter("sim:slot_steps", "Sum over steps of slots (steps * slots).",
                      s["steps"] * s["slots"])  # fmt: skip
        faults = CounterMetricFamily("sim:faults", "Injected faults by kind.", labels=["kind"])
        for kind, n in s["faults"].items():
            faults.add_metric([kind], n)
        yield faults


# ---------------------------------------------------------------------------------------
# Out-of-process helper and CLI
# ---------------------------------------------------------------------------------------


class SimProcess:
    """Run the sim in its own process (so it does not share the client's CPU/event loop).

    ``with SimProcess("--profile", "8b") as sp: sp.base_url, sp.stats()``
    """

    def __init__(self, *args: str):
        self.args = [sys.executable, str(Path(__file__).resolve()), "--port", "0", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> SimProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fake_vllm exited: {self.proc.wait()}")
        info = orjson.loads(line)
        self.url, self.model = info["url"], info["model"]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    @property
    def base_url(self) -> str:
        """OpenAI base URL."""
        return self.url + "/v1"

    def stats(self) -> dict[str, Any]:
        """The sim's counters (GET /sim/stats)."""
        with urllib.request.urlopen(self.url + "/sim/stats", timeout=10) as r:
            return orjson.loads(r.read())


async def _serve(a: argparse.Namespace) -> None:
    faults = Faults(parse_fault_flags(a.fault), retry_after_s=a.retry_after, stall_s=a.stall_s)
    profile = PROFILES[a.profile]
    if a.prefill_us_per_token is not None:
        profile = Profile(
            profile.name,
            profile.slots,
            profile.t0_s,
            profile.c_s,
            a.prefill_us_per_token * 1e-6,
            profile.max_model_len,
        )
    sim = VLLMSim(
        profile,
        model=a.model,
        host=a.host,
        port=a.port,
        speedup=a.speedup,
        slots=a.slots,
        corpus=a.corpus,
        unique=a.unique,
        faults=faults,
        seed=a.seed,
        judge=a.judge,
    )
    await sim.start()
    info = {"url": sim.url, "port": sim.port, "model": sim.model, "profile": profile.name}
    info["capacity_tok_s"] = sim.capacity_tok_s()
    print(orjson.dumps(info).decode(), flush=True)  # first line: read by SimProcess
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    """CLI: serve until interrupted."""
    ap = argparse.ArgumentParser(description="Simulated vLLM OpenAI-compatible server.")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="8b")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 = ephemeral (printed)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    ap.add_argument("--speedup", type=float, default=1.0, help="divide all engine times")
    ap.add_argument("--slots", type=int, default=None, help="override max_num_seqs")
    ap.add_argument("--prefill-us-per-token", type=float, default=None)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--unique", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--fault", action="append", default=[], metavar="KIND=P",
                    help=f"fault probability; kinds: {', '.join(FAULT_KINDS)}")  # fmt: skip
    ap.add_argument("--retry-after", type=float, default=1.0, help="429 Retry-After seconds")
    ap.add_argument("--stall-s", type=float, default=2.0, help="stall fault hold seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", choices=JUDGE_MODES, default="heuristic",
                    help="how judge-schema requests are answered")  # fmt: skip
    a = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(a))


if __name__ == "__main__":
    main()
