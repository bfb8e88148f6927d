"""The prompt fingerprint: one hash of every text that shapes what the model is asked.

An output folder built under other prompt texts is a different dataset, so the store
refuses to resume into it (``dreamgen.manifest``). The config's data fields are hashed
beside it (``Config.fingerprint``).
"""

from __future__ import annotations

import hashlib

import orjson

from dreamgen import evolution
from dreamgen.cards import CardSet
from dreamgen.pairs import CONTRADICTIONS
from dreamgen.taxonomy import DESCRIPTIONS, DIFFICULTY, all_values


def prompt_fingerprint(cards: CardSet) -> str:
    """A hash of every text that shapes what the model is asked: the card library (files)
    and the prompt text held in code (taxonomy values and descriptions, difficulty levels,
    evolution operators, minimal-pair contradictions). An output folder built under other
    texts is a different dataset, so the store refuses to resume into it."""
    texts = {
        "cards": cards.fingerprint,
        "taxonomy": all_values(),
        "descriptions": DESCRIPTIONS,
        "difficulty": {str(k): v for k, v in DIFFICULTY.items()},
        "operators": evolution.OPERATORS,
        "contradictions": list(CONTRADICTIONS),
    }
    return hashlib.sha256(orjson.dumps(texts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
