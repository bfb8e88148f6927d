"""The decision point as model input, for Records and labelled conversations alike.

A ``Conversation`` is what the probe and the experiment need from either format: the
context messages (ending in the user's decision turn), the cue spans and the distractor
spans that lie in the context, and the ids that tie it to its origin (for the held-out
disjointness check). ``read_conversations`` reads a JSONL file of either format (told apart
by its first line) or a dreamgen output folder.

``decision_inputs`` renders the context under the model's own chat template with the
generation prompt, so the last token is the decision position (the query that produces the
first response token), and splits every key position into one of the ``GROUPS``:

- ``sink``: the first ``sink_tokens`` positions (BOS, template preamble). Attention sinks
  soak up mass whatever the content is, so they are kept apart and reported separately;
- ``cue`` / ``distractor``: tokens overlapping a cue / distractor character span;
- ``cue_control`` / ``distractor_control``: the *other* tokens of the messages that hold a
  cue / a distractor: position-matched controls, so a rise on cues can be told from a rise
  on "that message" or "recent tokens";
- ``rest``: everything else (other messages, template markup, the decision query itself).

The groups are disjoint and cover every position, so a row's masses sum to 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from dreamgen.labelled import Labelled, LabelledError, read_labelled
from dreamgen.record import Record
from dreamgen.training import EncodeError, _render, _token_range, locate_messages

GROUPS = ("sink", "cue", "distractor", "cue_control", "distractor_control", "rest")
DEFAULT_SINK_TOKENS = 4


class ConversationError(ValueError):
    """A conversation file cannot be read (one line: the file, the line, what is wrong)."""


@dataclass(frozen=True)
class SpanRef:
    """A character span ``[start, end)`` of context message ``message``."""

    message: int
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Conversation:
    """A decision point with its labels, from a Record or a labelled line."""

    id: str
    group_id: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending in the decision turn
    cues: tuple[SpanRef, ...]
    distractors: tuple[SpanRef, ...]  # context distractors only (not in a response)
    responses: tuple[str, ...] = ()  # listening/reflex or target/contrast texts

    @classmethod
    def from_record(cls, record: Record) -> Conversation:
        """The context of a Record; distractors quoted from the contrast are left out."""
        n = len(record.messages)
        return cls(
            id=record.id,
            group_id=record.group_id,
            messages=tuple((m.role, m.content) for m in record.messages),
            cues=tuple(SpanRef(s.message, s.start, s.end, s.text) for s in record.cues),
            distractors=tuple(
                SpanRef(s.message, s.start, s.end, s.text)
                for s in record.distractors
                if s.message < n
            ),
            responses=(record.target.content, record.contrast.content),
        )

    @classmethod
    def from_labelled(cls, item: Labelled, line: int) -> Conversation:
        """A labelled line; without an ``id`` it is named by its line number."""
        rid = item.id or f"line-{line}"
        return cls(
            id=rid,
            group_id=item.group_id or rid,
            messages=tuple((m.role, m.content) for m in item.messages),
            cues=tuple(SpanRef(s.message, s.start, s.end, s.text) for s in item.cues),
            distractors=tuple(SpanRef(s.message, s.start, s.end, s.text) for s in item.distractors),
            responses=tuple(t for t in (item.listening, item.reflex) if t),
        )


def as_conversations(items: Iterable[Record | Labelled | Conversation]) -> list[Conversation]:
    """Records, labelled conversations or Conversations, as Conversations."""
    out: list[Conversation] = []
    for n, item in enumerate(items, start=1):
        if isinstance(item, Conversation):
            out.append(item)
        elif isinstance(item, Record):
            out.append(Conversation.from_record(item))
        else:
            out.append(Conversation.from_labelled(item, n))
    return out


def is_labelled_file(path: str | Path) -> bool:
    """Whether a JSONL file holds labelled conversations (its first line has no ``target``).

    Records always carry ``target``; labelled lines never do (``extra="forbid"``).
    """
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    first = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return True  # let the labelled reader name the line
                return not (isinstance(first, dict) and "target" in first)
    return True


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation in ``path``: a labelled JSONL file, a Record JSONL file or a
    dreamgen output folder. A bad line raises one-line ``ConversationError``."""
    from pydantic import ValidationError

    from dreamgen.errors import first_error
    from dreamgen.reader import read
    from dreamgen.store import StoreError

    target = Path(path)
    if not target.exists():
        raise ConversationError(f"{target}: no such file or folder")
    try:
        if target.is_file() and is_labelled_file(target):
            return [
                Conversation.from_labelled(item, n)
                for n, item in enumerate(read_labelled(target), start=1)
            ]
        return [Conversation.from_record(r) for r in read(target)]
    except LabelledError as exc:
        raise ConversationError(str(exc)) from None
    except ValidationError as exc:
        raise ConversationError(f"{target}: not a Record: {first_error(exc)}") from None
    except StoreError as exc:
        raise ConversationError(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise ConversationError(f"{target}: {' '.join(str(exc).split())}") from None


@dataclass(frozen=True)
class DecisionInputs:
    """Prompt tokens up to the decision position, with one group label per position."""

    input_ids: list[int]
    groups: list[int]  # an index into GROUPS per position

    def mask(self, group: str) -> list[bool]:
        """Positions in ``group``."""
        g = GROUPS.index(group)
        return [x == g for x in self.groups]

    def count(self, group: str) -> int:
        """How many positions are in ``group``."""
        return self.groups.count(GROUPS.index(group))


def decision_inputs(
    conv: Conversation, tokenizer: Any, *, sink_tokens: int = DEFAULT_SINK_TOKENS
) -> DecisionInputs:
    """The prompt of ``conv`` (chat template + generation prompt), each position grouped.

    Raises ``EncodeError`` if the template does not keep the messages verbatim or a span
    maps to no token.
    """
    chat = [{"role": r, "content": c} for r, c in conv.messages]
    text, starts = locate_messages(tokenizer, chat)
    prompt = _render(tokenizer, chat, True)
    if not prompt.startswith(text):
        raise EncodeError(f"{conv.id}: the generation prompt does not extend the rendered chat")
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    rest = GROUPS.index("rest")
    groups = [rest] * len(ids)

    def tokens_of(message: int, start: int, end: int) -> list[int]:
        return _token_range(offsets, starts[message] + start, starts[message] + end)

    # Lowest precedence first: later assignments win, so sink > cue/distractor > controls.
    for spans, control in ((conv.cues, "cue_control"), (conv.distractors, "distractor_control")):
        for message in {s.message for s in spans}:
            for i in tokens_of(message, 0, len(conv.messages[message][1])):
                groups[i] = GROUPS.index(control)
    for spans, name in ((conv.cues, "cue"), (conv.distractors, "distractor")):
        for span in spans:
            tokens = tokens_of(span.message, span.start, span.end)
            if not tokens:
                raise EncodeError(f"{conv.id}: span {span.text!r} maps to no tokens")
            for i in tokens:
                groups[i] = GROUPS.index(name)
    for i in range(min(sink_tokens, len(ids))):
        groups[i] = GROUPS.index("sink")
    return DecisionInputs(input_ids=ids, groups=groups)


def normalised_text(text: str) -> str:
    """Case- and whitespace-folded text, for overlap checks."""
    return " ".join(text.split()).casefold()


def overlap(train: Sequence[Conversation], heldout: Sequence[Conversation]) -> list[str]:
    """How ``heldout`` is not disjoint from ``train``: shared ids, groups, or any shared
    user/assistant message or response text (folded). System prompts are not compared:
    a generic one ("You are a helpful assistant.") is not content. Empty when disjoint."""
    problems: list[str] = []
    train_ids = {c.id for c in train}
    train_groups = {c.group_id for c in train}
    train_texts = set(_texts(train))
    for conv in heldout:
        if conv.id in train_ids:
            problems.append(f"{conv.id}: id is in the training data")
        elif conv.group_id in train_groups:
            problems.append(f"{conv.id}: group {conv.group_id!r} is in the training data")
        else:
            shared = next((t for t in _texts([conv]) if t in train_texts), None)
            if shared is not None:
                problems.append(f"{conv.id}: text {shared[:60]!r} is in the training data")
    return problems


def _texts(convs: Iterable[Conversation]) -> Iterator[str]:
    for conv in convs:
        for role, content in conv.messages:
            if role != "system" and content.strip():
                yield normalised_text(content)
        for response in conv.responses:
            if response.strip():
                yield normalised_text(response)
