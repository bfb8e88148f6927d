"""Records → model inputs under a real tokenizer (SmolLM2's) and two chat templates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import conftest  # noqa: E402

from dreamgen.record import Record  # noqa: E402
from dreamgen.training import (  # noqa: E402
    IGNORE_INDEX,
    EncodeError,
    TooLongError,
    WqDataset,
    WqIterableDataset,
    collate,
    encode,
    load_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]

# A Mistral-like template: no newline between the turn markup and the content, and no
# generation prompt, so span and response boundaries sit right against template text.
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def make_record(
    messages: list[tuple[str, str]],
    target: str,
    contrast: str,
    cues: list[tuple[int, str]],
    distractors: list[tuple[int | str, str]] = (),  # type: ignore[assignment]
    rid: str = "r1",
) -> Record:
    """A valid Record whose spans are found by exact search (first occurrence)."""
    return conftest.make_record(
        messages, target, contrast, cues, distractors, rid=rid, group_id="g"
    )


UNICODE = make_record(
    [
        ("user", "Parse the CSV — naïve approach, 日本語 headers 🚀, no pandas please."),
        ("assistant", "Sure. Though polars would be much faster here."),
        ("user", "Stick with the csv module and keep it to one function."),
    ],
    target="One function with the csv module, coming up.",
    contrast="Let me switch you to polars first; it is faster.",
    cues=[(0, "naïve approach, 日本語 headers 🚀"), (2, "Stick with the csv module")],
    distractors=[(1, "polars would be much faster"), ("contrast", "switch you to polars")],
    rid="unicode",
)
EDGES = make_record(
    [
        ("system", "You are a careful coding assistant."),
        ("user", "Only touch the parser. Tests pass, leave them alone"),
        ("assistant", "Understood; a refactor of the lexer could help too."),
        ("user", "No refactor. Fix the off-by-one and stop"),
    ],
    target="Fixed the off-by-one in the parser; nothing else changed.",
    contrast="I also refactored the lexer while I was there.",
    # cues at a message's very start and very end, several per message
    cues=[(1, "Only touch the parser."), (1, "leave them alone"), (3, "No refactor."), (3, "stop")],
    distractors=[(2, "a refactor of the lexer")],
    rid="edges",
)
RECORDS = [UNICODE, EDGES]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(params=["chatml", "inst"])
def tok(request, tokenizer):
    """The SmolLM2 tokenizer under its own ChatML template, then under INST_TEMPLATE."""
    original = tokenizer.chat_template
    if request.param == "inst":
        tokenizer.chat_template = INST_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = original


def runs(mask: list[int]) -> list[list[int]]:
    """Contiguous runs of 1s, as index lists."""
    out: list[list[int]] = []
    for i, m in enumerate(mask):
        if m and out and out[-1][-1] == i - 1:
            out[-1].append(i)
        elif m:
            out.append([i])
    return out


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)
def test_each_cue_maps_to_a_tight_token_run(tok, record):
    enc = encode(record, tok)
    ids = enc["input_ids"]
    groups = runs(enc["cue_mask"])
    assert len(groups) == len(record.cues)
    for group, cue in zip(groups, record.cues, strict=True):
        assert cue.text in decode(tok, [ids[i] for i in group])
        # tight: dropping the first or the last token loses part of the cue
        assert cue.text not in decode(tok, [ids[i] for i in group[1:]])
        assert cue.text not in decode(tok, [ids[i] for i in group[:-1]])
        assert group[-1] <= enc["decision_index"]  # cues are context, never response


def test_distractors_count_the_contrast_only_when_it_is_the_response(tok):
    as_target = encode(UNICODE, tok)
    as_contrast = encode(UNICODE, tok, target="contrast")
    assert len(runs(as_target["distractor_mask"])) == 1
    groups = runs(as_contrast["distractor_mask"])
    assert len(groups) == 2
    assert groups[1][0] > as_contrast["decision_index"]  # inside the response
    ids = as_contrast["input_ids"]
    assert "switch you to polars" in decode(tok, [ids[i] for i in groups[1]])


@pytest.mark.parametrize("which", ["target", "contrast"])
def test_labels_cover_only_the_response(tok, which):
    record = EDGES
    enc = encode(record, tok, target=which)
    ids, labels, d = enc["input_ids"], enc["labels"], enc["decision_index"]
    assert len(ids) == len(labels) == len(enc["attention_mask"]) == len(enc["cue_mask"])
    assert all(label == IGNORE_INDEX for label in labels[: d + 1])
    assert labels[d + 1 :] == ids[d + 1 :]
    response = getattr(record, which).content
    labelled = decode(tok, ids[d + 1 :])
    assert labelled.startswith(response)  # then only the template's end-of-turn markup
    assert response not in decode(tok, ids[: d + 1])
    # the prompt part is exactly what the model sees at generation time
    prompt = tok.apply_chat_template(
        [m.model_dump() for m in record.messages], tokenize=False, add_generation_prompt=True
    )
    assert decode(tok, ids[: d + 1]) == prompt


def test_max_length_truncates_the_response_and_rejects_long_prompts(tokenizer):
    full = encode(EDGES, tokenizer)
    d = full["decision_index"]
    cut = encode(EDGES, tokenizer, max_length=d + 3)
    assert len(cut["input_ids"]) == d + 3
    assert cut["input_ids"] == full["input_ids"][: d + 3]
    with pytest.raises(TooLongError):
        encode(EDGES, tokenizer, max_length=d)


def test_a_template_that_rewrites_content_is_a_clear_error(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    try:
        with pytest.raises(EncodeError, match="not verbatim"):
            encode(EDGES, tokenizer)
    finally:
        tokenizer.chat_template = original


def test_a_trimming_template_still_maps_spans(tokenizer):
    # Llama 3 style: ``| trim`` on content, so untrimmed content is not verbatim in the text
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    record = make_record(
        [
            ("user", "  Keep it in bash, please.\n"),
            ("assistant", "Python is nicer. "),
            ("user", "\nBash only.  "),
        ],
        target="Here is the bash version.",
        contrast="Here is a Python rewrite.",
        cues=[(0, "Keep it in bash"), (2, "Bash only.")],
        distractors=[(1, "Python is nicer.")],
    )
    try:
        enc = encode(record, tokenizer)
    finally:
        tokenizer.chat_template = original
    ids = enc["input_ids"]
    texts = [decode(tokenizer, [ids[i] for i in g]) for g in runs(enc["cue_mask"])]
    assert len(texts) == 2
    assert "Keep it in bash" in texts[0] and "Bash only." in texts[1]
    assert decode(tokenizer, ids[enc["decision_index"] + 1 :]).startswith("Here is the bash")


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_and_keeps_the_decision_token(tokenizer, side):
    items = WqDataset(RECORDS, tokenizer)
    batch = collate([items[0], items[1]], pad_token_id=0, padding_side=side)
    width = max(len(items[i]["input_ids"]) for i in range(2))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    assert batch["cue_mask"].dtype == torch.bool
    assert batch["id"] == ["unicode", "edges"]
    for row in range(2):
        item = items[row]
        n = len(item["input_ids"])
        pad = width - n
        real = slice(pad, width) if side == "left" else slice(0, n)
        padded = slice(0, pad) if side == "left" else slice(n, width)
        assert torch.equal(batch["input_ids"][row, real], item["input_ids"])
        assert (batch["input_ids"][row, padded] == 0).all()
        assert (batch["labels"][row, padded] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, padded] == 0).all()
        assert not batch["cue_mask"][row, padded].any()
        d = int(batch["decision_index"][row])
        assert d == item["decision_index"] + (pad if side == "left" else 0)
        assert batch["input_ids"][row, d] == item["input_ids"][item["decision_index"]]
        assert batch["labels"][row, d] == IGNORE_INDEX != batch["labels"][row, d + 1]


def test_preference_pairs_and_streaming_from_jsonl(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r.model_dump(mode="json")) + b"\n" for r in RECORDS))
    streamed = list(WqIterableDataset(path, tokenizer, include_contrast=True))
    assert [item["id"] for item in streamed] == ["unicode", "edges"]
    batch = collate(streamed, pad_token_id=0, padding_side="left")
    assert batch["input_ids"].shape == batch["contrast_input_ids"].shape
    for row in range(2):
        chosen = batch["input_ids"][row, batch["decision_index"][row] + 1 :]
        rejected = batch["contrast_input_ids"][row, batch["contrast_decision_index"][row] + 1 :]
        record = RECORDS[row]
        assert decode(tokenizer, chosen.tolist()).startswith(record.target.content)
        assert decode(tokenizer, rejected.tolist()).startswith(record.contrast.content)
    loader = torch.utils.data.DataLoader(
        WqIterableDataset(path, tokenizer), batch_size=2, collate_fn=lambda b: collate(b, 0)
    )
    assert next(iter(loader))["input_ids"].shape[0] == 2


def test_import_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import dreamgen.training, dreamgen.probe\n"
        "try:\n    dreamgen.training.WqDataset\nexcept ImportError:\n    print('lazy')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "lazy"
