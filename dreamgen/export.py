"""Export an output folder into the formats trainers take as they are.

``export(OUT, fmt, DEST)`` reads OUT's validated records and writes one file per split
(``train``, ``eval``, ``probe``; an empty split is not written), a dataset card
(``README.md``, see ``datacard.py``) whose YAML header names the split files, so
``datasets.load_dataset(DEST)`` returns a ``DatasetDict``, and ``export.json`` (what was
exported from where).

Formats (``FORMATS``):

- ``trl-sft``: TRL's conversational prompt-completion rows, ``prompt`` (the context
  messages) and ``completion`` (``[target]``): the loss falls on the listening response.
- ``trl-dpo``: TRL's conversational preference rows, ``prompt``, ``chosen`` (``[target]``)
  and ``rejected`` (``[contrast]``).
- ``sharegpt``: ``conversations`` (``from``/``value`` turns, the target appended; each
  turn's ``train`` is true on the target only), plus ``prompt`` (the context only),
  ``chosen`` and ``rejected`` (one turn each) for preference trainers.
- ``openai-chat``: ``messages`` (the full conversation with the target appended) and
  nothing else, as the OpenAI fine-tuning format defines; ids and spans go to a sidecar
  ``SPLIT.spans.jsonl``, line for line.
- ``hf``: a ``datasets.DatasetDict`` saved with ``save_to_disk`` (every split present)
  plus the per-split JSONL; the columns of ``trl-dpo`` plus ``completion``, so one folder
  serves SFT and DPO.

No export has a ``messages`` column that holds the context alone: a record's ``messages``
end at the user's decision turn, and a trainer that finds a ``messages`` column trains on
it whole, so it would never see the target. The context is called ``prompt`` instead.

Spans (``cues``, ``distractors``: ``{message, start, end, kind, text}``) keep the Record
convention: ``message`` indexes ``prompt + [target, contrast]``, i.e. a value of
``len(prompt)`` is the target (``completion[0]``/``chosen[0]``) and ``len(prompt) + 1``
the contrast (``rejected[0]``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from dreamgen.diskio import StoreError
from dreamgen.record import Message, Record, Span
from dreamgen.version import __version__

Format = Literal["trl-sft", "trl-dpo", "sharegpt", "openai-chat", "hf"]
FORMATS: tuple[str, ...] = get_args(Format)
SPLITS = ("train", "eval", "probe")
MARKER = "export.json"  # written last: its presence means the folder is a finished export
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


class ExportError(Exception):
    """An export cannot be made or pushed; the message says why, in one line."""


@dataclass
class ExportResult:
    """What an export wrote."""

    dest: Path
    fmt: str
    counts: dict[str, int]
    files: list[Path] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _messages(messages: Iterable[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _spans(spans: list[Span]) -> list[dict[str, Any]]:
    return [s.model_dump() for s in spans]


def metadata(record: Record) -> dict[str, Any]:
    """The flat columns every (non-OpenAI) export carries: ids, split, taxonomy, spans."""
    return {
        "id": record.id,
        "split": record.split,
        "group_id": record.group_id,
        "parent_id": record.parent_id,
        "generation": record.generation,
        "mode": record.mode,
        "minimal_pair": record.minimal_pair,
        "difficulty": record.difficulty,
        "cue_kind": record.axes.cue_kind,
        "distractor_kind": record.axes.distractor_kind,
        "domain": record.axes.domain,
        "emotion": record.axes.emotion,
        "momentum": record.axes.momentum,
        "card": record.provenance.card,
        "model": record.provenance.model,
        "cues": _spans(record.cues),
        "distractors": _spans(record.distractors),
    }


def _trl_sft(r: Record) -> dict[str, Any]:
    return {"prompt": _messages(r.messages), "completion": _messages([r.target]), **metadata(r)}


def _trl_dpo(r: Record) -> dict[str, Any]:
    return {
        "prompt": _messages(r.messages),
        "chosen": _messages([r.target]),
        "rejected": _messages([r.contrast]),
        **metadata(r),
    }


def _turn(m: Message) -> dict[str, str]:
    return {"from": SHAREGPT_ROLE[m.role], "value": m.content}


def _sharegpt(r: Record) -> dict[str, Any]:
    # `train` marks the one turn to learn: the earlier assistant turns hold the assistant's
    # own idea (the distractors), which a trainer must not learn to say.
    turns = [{**_turn(m), "train": False} for m in r.messages]
    return {
        "conversations": [*turns, {**_turn(r.target), "train": True}],
        "prompt": [_turn(m) for m in r.messages],
        "chosen": _turn(r.target),
        "rejected": _turn(r.contrast),
        **metadata(r),
    }


def _openai_chat(r: Record) -> dict[str, Any]:
    return {"messages": _messages([*r.messages, r.target])}


def _hf(r: Record) -> dict[str, Any]:
    return {**_trl_dpo(r), "completion": _messages([r.target])}


ROW: dict[str, Callable[[Record], dict[str, Any]]] = {
    "trl-sft": _trl_sft,
    "trl-dpo": _trl_dpo,
    "sharegpt": _sharegpt,
    "openai-chat": _openai_chat,
    "hf": _hf,
}


def row(record: Record, fmt: str) -> dict[str, Any]:
    """One record as one row of ``fmt``."""
    return ROW[fmt](record)


def _sidecar(r: Record) -> dict[str, Any]:
    """openai-chat's side file: what its rows cannot hold (spans index ``messages``, whose
    last entry is the target; ``len(messages)`` is the contrast given here)."""
    return {**metadata(r), "contrast": _messages([r.contrast])[0]}


def _load_records(source: Path) -> list[Record]:
    from dreamgen.reader import read

    if not source.exists():
        raise ExportError(f"{source} does not exist")
    try:
        return list(read(source))
    except StoreError as exc:
        raise ExportError(str(exc)) from None
    except OSError as exc:
        raise ExportError(f"cannot read {source}: {exc.strerror or exc}") from None


def _prepare_dest(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not force:
            raise ExportError(f"{dest} is not empty (--force replaces an earlier export)")
        if not (dest / MARKER).is_file():
            # --force replaces our own exports only, never a folder someone else filled.
            raise ExportError(f"{dest} is not empty and holds no {MARKER}: not replacing it")


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("wb") as fh:
        for r in rows:
            fh.write(orjson.dumps(r))
            fh.write(b"\n")


def export(
    source: str | Path,
    fmt: str,
    dest: str | Path,
    *,
    force: bool = False,
) -> ExportResult:
    """Export the records of ``source`` (an output folder or JSONL) as ``fmt`` into ``dest``.

    The export is written into a sibling temp folder and renamed into place, so ``dest``
    is either the old export or the new one, never half of each. Raises ExportError.
    """
    from dreamgen.datacard import write_card

    source, dest = Path(source), Path(dest)
    if fmt not in ROW:
        raise ExportError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    _prepare_dest(dest, force)
    records = _load_records(source)
    if not records:
        raise ExportError(f"{source} holds no records (closed shards) to export")
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in records:
        by_split[r.split].append(r)
    counts = {s: len(rs) for s, rs in by_split.items()}
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        files = _write_splits(tmp, fmt, by_split)
        if fmt == "hf":
            _save_to_disk(tmp, by_split)
        manifest = _manifest(source)
        write_card(tmp, fmt, source, records, counts, manifest)
        info = {
            "format": fmt,
            "source": str(source.resolve()),
            "counts": counts,
            "fingerprint": manifest.get("fingerprint", ""),
            "dreamgen_version": __version__,
        }
        (tmp / MARKER).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(dest, fmt, counts, [dest / f.name for f in files])


def _write_splits(tmp: Path, fmt: str, by_split: dict[str, list[Record]]) -> list[Path]:
    files: list[Path] = []
    for split, rs in by_split.items():
        if not rs:
            continue
        path = tmp / f"{split}.jsonl"
        _write_jsonl(path, (row(r, fmt) for r in rs))
        files.append(path)
        if fmt == "openai-chat":
            side = tmp / f"{split}.spans.jsonl"
            _write_jsonl(side, (_sidecar(r) for r in rs))
            files.append(side)
    return files


def _save_to_disk(tmp: Path, by_split: dict[str, list[Record]]) -> None:
    try:
        from datasets import Dataset, DatasetDict
        from datasets.utils import logging as ds_logging
    except ImportError:
        raise ExportError(
            "--format hf needs the datasets library (pip install 'dreamgen[train]')"
        ) from None
    tables = {s: Dataset.from_list([_hf(r) for r in rs]) for s, rs in by_split.items() if rs}
    # Every split is present in the DatasetDict; an empty one takes the others' features.
    features = next(iter(tables.values())).features
    for split in SPLITS:
        if split not in tables:
            tables[split] = Dataset.from_list([], features=features)
    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # a bar per split is noise in a one-line command
    try:
        DatasetDict({s: tables[s] for s in SPLITS}).save_to_disk(str(tmp))
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def _manifest(source: Path) -> dict[str, Any]:
    path = source / "manifest.json"
    try:
        data = orjson.loads(path.read_bytes()) if path.is_file() else {}
    except (OSError, orjson.JSONDecodeError):
        data = {}
    return data if isinstance(data, dict) else {}


def push_to_hub(dest: str | Path, repo: str, *, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face Hub as dataset ``repo``; returns its URL.

    Needs a token (``HF_TOKEN`` or ``hf auth login``) and the network; raises ExportError
    with one line when either is missing or the Hub refuses.
    """
    dest = Path(dest)
    if not (dest / MARKER).is_file():
        raise ExportError(f"{dest} is not a dreamgen export (no {MARKER})")
    try:
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise ExportError(
            "--push-to-hub needs huggingface_hub (pip install 'dreamgen[train]')"
        ) from None
    token = get_token()
    if not token:
        raise ExportError(
            "--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo,
            repo_type="dataset",
            folder_path=str(dest),
            commit_message=f"dreamgen {__version__} export",
        )
    except HfHubHTTPError as exc:
        raise ExportError(f"the Hub refused the upload to {repo}: {_one_line(exc)}") from None
    except Exception as exc:
        # Connection failures arrive as the Hub client's own HTTP library's errors
        # (requests, httpx or httpx2 by huggingface_hub version), not a common base class.
        raise ExportError(f"cannot reach the Hub to push {repo}: {_one_line(exc)}") from None
    return str(info.commit_url or f"https://huggingface.co/datasets/{repo}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
