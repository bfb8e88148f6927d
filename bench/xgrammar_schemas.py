"""How fast xgrammar (vLLM's grammar engine) decodes under each schema dreamgen sends.

For every model-facing schema, in both renderings (``bounded``: ``maxLength`` on strings,
as llama.cpp's small model needs; ``unbounded``: the same schema without string length
bounds, as sent to vLLM), this compiles the schema with xgrammar for SmolLM2's tokenizer
and feeds real answers (``bench/corpus/scenarios.jsonl``, written by a model) through the
matcher token by token, timing the per-token mask computation — the work vLLM does on CPU
for every generated token of a guided request. Figures are side by side in one run:

    python bench/xgrammar_schemas.py

The last line is ``xgrammar_mask_us_per_token: V`` (worst schema, in the rendering vLLM
gets).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "bench" / "corpus" / "scenarios.jsonl"


def main() -> None:
    import xgrammar as xgr

    from dreamgen.scenario import SCHEMAS, schema_for
    from dreamgen.training import load_tokenizer

    print(f"load: {os.getloadavg()[0]:.2f}", flush=True)
    tok = load_tokenizer("smollm2")
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    answers = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]
    rows = []
    for name in SCHEMAS:
        for dialect in ("bounded", "unbounded"):
            schema = json.dumps(schema_for(name, dialect))
            compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            t0 = time.perf_counter()
            compiled = compiler.compile_json_schema(schema)
            compile_ms = 1e3 * (time.perf_counter() - t0)
            bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
            per_token: list[float] = []
            accepted = rejected = 0
            for answer in answers:
                ids = tok.encode(answer, add_special_tokens=False)
                matcher = xgr.GrammarMatcher(compiled)
                ok = True
                for t in ids:
                    t0 = time.perf_counter_ns()
                    matcher.fill_next_token_bitmask(bitmask)
                    per_token.append((time.perf_counter_ns() - t0) / 1e3)
                    if not matcher.accept_token(t):
                        ok = False
                        break
                accepted += ok
                rejected += not ok
            rows.append(
                {
                    "schema": name,
                    "dialect": dialect,
                    "compile_ms": compile_ms,
                    "mask_us_mean": statistics.fmean(per_token),
                    "mask_us_p99": sorted(per_token)[int(0.99 * (len(per_token) - 1))],
                    "tokens": len(per_token),
                    "answers_accepted": accepted,
                    "answers_rejected": rejected,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'schema':22} {'dialect':10} {'compile ms':>10} {'mask µs':>8} {'p99 µs':>8} {'ok':>4}")
    for r in rows:
        print(
            f"{r['schema']:22} {r['dialect']:10} {r['compile_ms']:10.1f} {r['mask_us_mean']:8.1f} "
            f"{r['mask_us_p99']:8.1f} {r['answers_accepted']:4}"
        )
    for name in SCHEMAS:
        b, u = (next(r for r in rows if r["schema"] == name and r["dialect"] == d)
                for d in ("bounded", "unbounded"))  # fmt: skip
        print(f"{name}: bounded/unbounded mask time {b['mask_us_mean'] / u['mask_us_mean']:.2f}x")
    worst = max(r["mask_us_mean"] for r in rows if r["dialect"] == "unbounded")
    print(f"load: {os.getloadavg()[0]:.2f}")
    print(f"xgrammar_mask_us_per_token: {worst:.1f}")


if __name__ == "__main__":
    main()
