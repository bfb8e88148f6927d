"""Fuzz ``dreamgen.validate`` with generated malformed and adversarial model outputs.

Whatever a model (or a broken proxy) sends back, validation ends in exactly one of two
ways: a ``Rejected`` whose reason is one of ``REASONS``, or a ``Record`` that is valid
(exact spans) and survives the store's serialisation round trip. Any other exception is
a bug. The tests below throw 1,500 generated outputs at it (the ``max_examples`` sum):
random bytes and text, broken JSON, arbitrary JSON values, wrong types in every field,
deep nesting, huge strings, control characters, quotes that do not occur, and
valid-shaped scenarios with adversarial content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamgen.cards import CardSet
from dreamgen.config import PlanConfig
from dreamgen.planner import Planner
from dreamgen.record import Record
from dreamgen.request import Request
from dreamgen.stages import REASONS
from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum
from dreamgen.validate import Rejected, validate

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "corpus" / "scenarios.jsonl"
SCENARIOS: list[dict[str, Any]] = [
    orjson.loads(line) for line in CORPUS.read_bytes().splitlines() if line.strip()
]
_CARDS = CardSet.load()
DIRECTED: Request = Planner(_CARDS, PlanConfig(seed=7), target=100).next()
UNDIRECTED: Request = Planner(_CARDS, PlanConfig(seed=7, undirected_share=1.0), 100).next()
REQUESTS = st.sampled_from([DIRECTED, UNDIRECTED, None])
FINISH = st.sampled_from(["stop", "stop", "stop", "length", "", "content_filter", "tool_calls"])


def fuzz(n: int) -> settings:
    """``n`` examples, no deadline (huge strings take a while), no example database."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Characters that break naive code: controls, NUL, zero-width and bidi marks, BOM, curly
# quotes and dashes that the tolerant quote search folds, '…' (folds to three chars),
# 'İ' (lowercases to two code points), combining marks, astral-plane emoji.
NASTY = "\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\u00a0\u200b\u200d\u200e\u202e\u2028\u2029\ufeff"
NASTY += '\u2018\u2019\u201c\u201d\u2013\u2014\u2212\u2026\u0130\u0301\u0336\U0001f600"\\{}[],:'
NASTY_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(NASTY), st.characters(blacklist_categories=("Cs",))),
    max_size=300,
)
HUGE_TEXT = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["x", " ", "\u00e9", "\U0001f600", "\\n", "é "]),
    st.integers(1_000, 200_000),
)
TEXT = st.one_of(NASTY_TEXT, st.sampled_from(["", " ", "\n\t", "null"]), HUGE_TEXT)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    NASTY_TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(NASTY_TEXT, inner, max_size=5)
    ),
    max_leaves=25,
)
KINDS_CUE = [k.value for k in CueKind]
KINDS_DIS = [k.value for k in DistractorKind]


def outcome(raw: Any, request: Request | None, finish_reason: str = "stop") -> str:
    """Validate; assert the outcome is a named rejection or a valid, storable Record."""
    try:
        record = validate(raw, request, finish_reason=finish_reason, model="m", engine="e")
    except Rejected as rej:
        assert rej.reason in REASONS, rej.reason
        assert rej.message
        return rej.reason
    assert isinstance(record, Record)
    for span in record.cues + record.distractors:
        assert record.content_of(span.message)[span.start : span.end] == span.text
    line = orjson.dumps(record.model_dump(mode="json"))  # what the store writes
    assert Record.model_validate_json(line) == record
    return "ok"


def scenario_dict(i: int) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(SCENARIOS[i % len(SCENARIOS)]))


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value (dict keys and list indices), the root excluded."""
    if not isinstance(value, dict | list):
        return []
    out: list[tuple[Any, ...]] = []
    for k, v in value.items() if isinstance(value, dict) else enumerate(value):
        out.append((*prefix, k))
        out += paths(v, (*prefix, k))
    return out


def put(value: Any, path: tuple[Any, ...], new: Any) -> None:
    for k in path[:-1]:
        value = value[k]
    value[path[-1]] = new


# ---- raw junk ----------------------------------------------------------------------------


@fuzz(150)
@given(raw=st.binary(max_size=3000), request=REQUESTS, finish=FINISH)
def test_random_bytes(raw: bytes, request: Request | None, finish: str) -> None:
    outcome(raw, request, finish)


@fuzz(150)
@given(raw=TEXT, request=REQUESTS)
def test_random_text(raw: str, request: Request | None) -> None:
    outcome(raw, request)


@fuzz(200)
@given(
    i=st.integers(0, len(SCENARIOS) - 1),
    op=st.sampled_from(["truncate", "delete", "insert", "replace", "duplicate", "swap"]),
    at=st.floats(0, 1),
    junk=st.one_of(NASTY_TEXT, st.sampled_from([",", "}", "]", '"', "\\", "\\u12", "NaN"])),
    request=REQUESTS,
)
def test_broken_json(i: int, op: str, at: float, junk: str, request: Request | None) -> None:
    text = orjson.dumps(SCENARIOS[i]).decode()
    k = int(at * len(text))
    if op == "truncate":
        text = text[:k]
    elif op == "delete":
        text = text[:k] + text[k + 1 :]
    elif op == "insert":
        text = text[:k] + junk + text[k:]
    elif op == "replace":
        text = text[:k] + (junk[:1] or "#") + text[k + 1 :]
    elif op == "duplicate":
        text = text[:k] + text[k // 2 : k] + text[k:]
    else:  # swap two halves
        text = text[k:] + text[:k]
    outcome(text, request)
    outcome(text.encode(), request)


@fuzz(150)
@given(value=JSON_VALUES, request=REQUESTS)
def test_any_json_value(value: Any, request: Request | None) -> None:
    outcome(orjson.dumps(value), request)


# ---- scenario-shaped junk ----------------------------------------------------------------


@fuzz(200)
@given(data=st.data(), i=st.integers(0, len(SCENARIOS) - 1), request=REQUESTS)
def test_wrong_types_anywhere(data: st.DataObject, i: int, request: Request | None) -> None:
    """One field (at any depth) replaced by an arbitrary JSON value, or dropped, or added."""
    d = scenario_dict(i)
    if request is UNDIRECTED or (request is None and data.draw(st.booleans())):
        d.update(domain="web", emotion="tired", momentum="executing", difficulty=3)
    path = data.draw(st.sampled_from(paths(d)))
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        put(d, path, data.draw(JSON_VALUES))
    elif action == "drop" and isinstance(d.get(path[0]), dict | list | str | int):
        parent: Any = d
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
    else:
        d[data.draw(NASTY_TEXT)] = data.draw(JSON_VALUES)
    outcome(orjson.dumps(d), request)


@fuzz(100)
@given(
    depth=st.integers(1, 5000),
    opener=st.sampled_from(["[", '{"a":', '{"opening":', "[{", '["x",']),
    balanced=st.booleans(),
    inside=st.booleans(),
    request=REQUESTS,
)
def test_deep_nesting(
    depth: int, opener: str, balanced: bool, inside: bool, request: Request | None
) -> None:
    closer = {"[": "]", '{"a":': "}", '{"opening":': "}", "[{": "}]", '["x",': "]"}[opener]
    leaf = '{"a":1}' if opener.endswith(":") else "1"
    nested = opener * depth + leaf + (closer * depth if balanced else "")
    if inside:  # deep junk in one field of an otherwise valid scenario
        text = orjson.dumps(SCENARIOS[depth % len(SCENARIOS)]).decode()
        nested = text.replace('"exchanges":[]', f'"exchanges":[{nested}]', 1)
    outcome(nested, request)


@fuzz(50)
@given(
    i=st.integers(0, len(SCENARIOS) - 1),
    field=st.sampled_from(
        ["opening", "listening", "reflex", "idea_turn.idea", "decision_turn.cue"]
    ),
    huge=HUGE_TEXT,
    request=REQUESTS,
)
def test_huge_strings(i: int, field: str, huge: str, request: Request | None) -> None:
    d = scenario_dict(i)
    put(d, tuple(field.split(".")), huge)
    outcome(orjson.dumps(d), request)


def _turns(d: dict[str, Any]) -> list[str]:
    it, dt = d["idea_turn"], d["decision_turn"]
    turns = [d["opening"]]
    for ex in d["exchanges"]:
        turns += [ex["assistant"], ex["user"]]
    return [*turns, it["before"] + it["idea"] + it["after"], dt["before"] + dt["cue"] + dt["after"]]


def _drift(text: str, how: str) -> str:
    """A quote as a model misremembers it: case, whitespace, curly quotes, ellipsis."""
    if how == "upper":
        return text.upper()
    if how == "spaces":
        return "  ".join(text.split())
    if how == "curly":
        return text.replace("'", "\u2019").replace('"', "\u201c")
    if how == "ellipsis":
        return text.replace("...", "\u2026")
    return text


def _fit(text: str, lo: int, hi: int, pad: str = " ok.") -> str:
    """Clip or pad ``text`` into [lo, hi] characters, so the schema lets it through."""
    while len(text) < lo:
        text += pad
    return text[:hi]


@st.composite
def adversarial_scenarios(draw: st.DrawFn, request: Request | None) -> dict[str, Any]:
    """Schema-valid scenarios (mostly) whose strings are hostile and quotes may not occur.

    Lengths, kinds and turn indices stay inside the schema's bounds most of the time, so
    the examples get past parsing and exercise labelling: segment joins, the tolerant
    quote search, span offsets, the Record's invariants. One in ten breaks a bound.
    """
    d = scenario_dict(draw(st.integers(0, len(SCENARIOS) - 1)))
    hostile = st.one_of(NASTY_TEXT, st.sampled_from(["", " ", "\u200b", "\x00", "...", "\u2026"]))
    bounds = {"opening": (1, 400), "listening": (20, 600), "reflex": (20, 600)}
    for key, (lo, hi) in bounds.items():
        if draw(st.booleans()):
            d[key] = _fit(draw(hostile), lo, hi)
    for turn, seg in (("idea_turn", "idea"), ("decision_turn", "cue")):
        for key in ("before", seg, "after"):
            if draw(st.integers(0, 2)) == 0:
                lo = 3 if key == seg else 0
                d[turn][key] = _fit(
                    draw(hostile), lo, 200, pad=draw(st.sampled_from([" ", "a", "\n"]))
                )
    if draw(st.integers(0, 4)) == 0:  # identical up to case and spacing
        d["listening"] = "  " + d["reflex"].upper() + " "
    if draw(st.integers(0, 4)) == 0:  # a listening reply that opens with the idea
        d["listening"] = _fit(d["idea_turn"]["idea"] + " " + d["listening"], 20, 600)
    rare = st.integers(0, 9).map(lambda k: k == 5)  # one in ten, not hypothesis' favourite 0
    d["decision_turn"]["kind"] = "made_up" if draw(rare) else draw(st.sampled_from(KINDS_CUE))
    d["idea_turn"]["kind"] = draw(st.sampled_from(KINDS_DIS))
    turns = _turns(d)
    users = [i for i in range(len(turns)) if i % 2 == 0]  # opening, then alternating
    assistants = [-1] + [i for i in range(len(turns)) if i % 2 == 1]  # -1: the reflex
    for key, kinds, own in (
        ("extra_cues", KINDS_CUE, users),
        ("extra_distractors", KINDS_DIS, assistants),
    ):
        quotes = []
        for _ in range(draw(st.integers(0, 2))):
            t = draw(st.integers(-9, 99)) if draw(rare) else draw(st.sampled_from(own))
            if draw(rare):  # a turn of the wrong role, or one past the end
                t = draw(st.integers(-1, 7))
            source = turns[t] if 0 <= t < len(turns) else d["reflex"]
            a = draw(st.integers(0, max(0, len(source) - 1)))
            b = draw(st.integers(min(a + 1, len(source)), min(len(source), a + 200)))
            drift = st.sampled_from(["upper", "spaces", "curly", "ellipsis"])
            quote = draw(
                st.one_of(
                    st.just(source[a:b]),  # occurs (maybe only whitespace)
                    st.builds(_drift, st.just(source[a:b]), drift),  # occurs, misremembered
                    NASTY_TEXT.map(lambda q: q[:200]),  # almost surely does not occur
                )
            )
            quotes.append({"turn": t, "quote": quote, "kind": draw(st.sampled_from(kinds))})
        d[key] = quotes
    # The undirected axes belong to undirected requests (and to request-less validation).
    if (request is not DIRECTED) != draw(rare):
        d.update(
            domain=draw(st.sampled_from([x.value for x in Domain])),
            emotion=draw(st.sampled_from([x.value for x in Emotion])),
            momentum=draw(st.sampled_from([x.value for x in Momentum])),
            difficulty=7 if draw(rare) else draw(st.integers(1, 5)),
        )
    return d


@fuzz(250)
@given(data=st.data(), request=REQUESTS, as_dict=st.booleans())
def test_adversarial_content(data: st.DataObject, request: Request | None, as_dict: bool) -> None:
    d = data.draw(adversarial_scenarios(request))
    outcome(d if as_dict else orjson.dumps(d), request)


# ---- record-shaped junk (validate also checks whole records) --------------------------


@pytest.fixture(scope="module")
def good_record() -> dict[str, Any]:
    for i in range(len(SCENARIOS)):
        try:
            record = validate(orjson.dumps(SCENARIOS[i]), DIRECTED)
        except Rejected:
            continue
        return record.model_dump(mode="json")
    raise AssertionError("no corpus scenario validates")


@fuzz(150)
@given(data=st.data(), request=st.sampled_from([None, DIRECTED]))
def test_record_shaped(
    good_record: dict[str, Any], data: st.DataObject, request: Request | None
) -> None:
    """A whole Record with one value anywhere replaced: offsets, roles, kinds, junk."""
    d = orjson.loads(orjson.dumps(good_record))
    path = data.draw(st.sampled_from(paths(d)))
    new = data.draw(
        st.one_of(JSON_VALUES, st.integers(-5, 10_000), st.sampled_from(["target", "contrast"]))
    )
    put(d, path, new)
    outcome(orjson.dumps(d), request)


@fuzz(100)
@given(
    depth=st.integers(1, 1100),
    field=st.sampled_from(["quality", "provenance.sampling", "axes", "messages"]),
    request=st.sampled_from([None, DIRECTED]),
)
def test_record_with_deep_junk(
    good_record: dict[str, Any], depth: int, field: str, request: Request | None
) -> None:
    """Nesting deeper than the writer (255) or the reader (pydantic) accepts, in a record.

    A model's answer shaped like a Record is rejected whatever it holds; without a request,
    a record only passes if the store can write it and the reader parse it back.
    """
    d = orjson.loads(orjson.dumps(good_record))
    put(d, tuple(field.split(".")), {"x": "DEEP"})
    raw = orjson.dumps(d).decode().replace('"DEEP"', "[" * depth + "]" * depth)
    allowed = {"schema", "invalid_json"} | ({"ok"} if request is None else set())
    assert outcome(raw, request) in allowed
