"""Input readers: OpenAI messages, ShareGPT, Parquet, Hugging Face datasets folders."""

from __future__ import annotations

from pathlib import Path

import datasets
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dreamgen.conversations import BadInput, Conversation, InputError, read_conversations

CHAT = [
    {"role": "user", "content": "Make the loader faster."},
    {"role": "assistant", "content": "We could also rewrite it in Rust."},
    {"role": "user", "content": "Only the loader, in Python."},
]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def good(items: list[Conversation | BadInput]) -> list[Conversation]:
    return [i for i in items if isinstance(i, Conversation)]


def test_openai_messages_with_content_parts(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Only the loader,"}, {"type": "text", "text": "in Python."}]
    row = {"id": 7, "messages": [*CHAT[:2], {"role": "user", "content": parts}]}
    (conv,) = list(read_conversations(write_jsonl(tmp_path / "a.jsonl", [row])))
    assert isinstance(conv, Conversation)
    assert conv.source_id == "7" and conv.index == 0
    assert conv.messages[2] == {"role": "user", "content": "Only the loader,\nin Python."}


def test_sharegpt(tmp_path: Path) -> None:
    roles = {"user": "human", "assistant": "gpt"}
    row = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT]}
    (conv,) = good(list(read_conversations(write_jsonl(tmp_path / "s.jsonl", [row]))))
    assert conv.messages == CHAT


def test_parquet_with_column(tmp_path: Path) -> None:
    table = pa.table({"chat": [CHAT, CHAT[:1]], "n": [1, 2]})
    pq.write_table(table, tmp_path / "t.parquet")
    items = list(read_conversations(tmp_path / "t.parquet", column="chat"))
    assert [i.index for i in items] == [0, 1]
    assert good(items)[0].messages == CHAT
    assert items[1].where.endswith("t.parquet:row 2")
    (bad,) = list(read_conversations(tmp_path / "t.parquet", column="nope"))[:1]
    assert isinstance(bad, BadInput) and "no 'nope' field" in bad.detail


def test_datasets_folders(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[:2]}])
    ds.save_to_disk(str(tmp_path / "one"))
    items = good(list(read_conversations(tmp_path / "one")))
    assert [c.messages for c in items] == [CHAT, CHAT[:2]]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    items = good(list(read_conversations(tmp_path / "dd")))
    assert [c.index for c in items] == [0, 1, 2]
    # A hub-style folder of data files, read in name order.
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.table({"messages": [CHAT]}), tmp_path / "hub" / "b.parquet")
    write_jsonl(tmp_path / "hub" / "a.jsonl", [{"messages": CHAT[:1]}])
    items = good(list(read_conversations(tmp_path / "hub")))
    assert [len(c.messages) for c in items] == [1, 3]


def test_bad_lines_are_named_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        orjson.dumps({"messages": CHAT}),
        b"",
        b"{not json",
        orjson.dumps({"text": "hi"}),
        orjson.dumps({"messages": [{"role": "tool", "content": "x"}]}),
        orjson.dumps({"messages": CHAT}),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = list(read_conversations(path))
    assert [i.index for i in items] == [0, 1, 2, 3, 4, 5]
    bad = [i for i in items if isinstance(i, BadInput)]
    assert [b.where for b in bad] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert bad[0].detail == "empty line"
    assert bad[1].detail.startswith("not JSON")
    assert "--column" in bad[2].detail
    assert "unknown role 'tool'" in bad[3].detail
    assert len(good(items)) == 2


def test_missing_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        list(read_conversations(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet"):
        list(read_conversations(tmp_path / "empty"))
