"""``dreamgen preview``: a few scenarios from the configured engine, printed, never stored.

For checking a card or a model before a large run: the planner's requests go to the
engine, answers pass the label and rule-filter stages (no dedup, no store, no output
folder), and each accepted scenario is printed with its spans marked in place:
``[cue:KIND]text[/cue]`` (green) and ``[distractor:KIND]text[/distractor]`` (red), so the
marks read without colour too. Rejected answers are counted by reason.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from rich.console import Console
from rich.text import Text

from dreamgen.cards import CardSet
from dreamgen.config import Config
from dreamgen.engines import Engine, EngineError, open_engine
from dreamgen.planner import Planner
from dreamgen.record import Record, Span
from dreamgen.request import Request
from dreamgen.scenario import response_format
from dreamgen.stages import Chain, Filter, Item, Label


class PreviewError(Exception):
    """The preview cannot run (unknown card, engine failure); one line."""


def mark(content: str, cues: list[Span], distractors: list[Span]) -> Text:
    """``content`` with each cue and distractor wrapped in visible, coloured marks."""
    tagged = [(s, "cue") for s in cues] + [(s, "distractor") for s in distractors]
    text = Text()
    pos = 0
    for span, role in sorted(tagged, key=lambda t: t[0].start):
        if span.start < pos:  # overlapping spans: the first one gets the marks
            continue
        style = "bold green" if role == "cue" else "bold red"
        text.append(content[pos : span.start])
        text.append(f"[{role}:{span.kind}]", style=style)
        text.append(content[span.start : span.end], style=style)
        text.append(f"[/{role}]", style=style)
        pos = span.end
    text.append(content[pos:])
    return text


def render(record: Record) -> list[Text]:
    """The record as printable lines: a header, every message, target and contrast."""
    a = record.axes
    lines = [
        Text(
            f"── {record.provenance.card} · {a.cue_kind} / {a.distractor_kind} · "
            f"difficulty {record.difficulty} · {a.domain} · {a.emotion} · {a.momentum} "
            f"· {record.mode}",
            style="bold",
        )
    ]
    names = [m.role for m in record.messages] + ["target (listening)", "contrast (reflex)"]
    for i, name in enumerate(names):
        line = Text(f"{name}: ", style="cyan")
        line.append_text(
            mark(
                record.content_of(i),
                [s for s in record.cues if s.message == i],
                [s for s in record.distractors if s.message == i],
            )
        )
        lines.append(line)
    return lines


async def _collect(
    config: Config, cards: CardSet, count: int, attempts: int
) -> tuple[list[Record], Counter[str]]:
    planner = Planner(cards, config.plan, count)
    chain = Chain([Label(), Filter()])
    kept: list[Record] = []
    rejected: Counter[str] = Counter()
    async with open_engine(config) as (engine, limit):
        sent = 0
        while len(kept) < count and sent < attempts:
            batch = [planner.next() for _ in range(min(limit, count - len(kept), attempts - sent))]
            sent += len(batch)
            results = await asyncio.gather(*(_one(engine, config, r) for r in batch))
            for request, item in zip(batch, results, strict=True):
                if isinstance(item, str):
                    rejected[item] += 1
                    continue
                outcome = chain.process(item)
                if outcome.reason is not None:
                    rejected[str(outcome.reason)] += 1
                    planner.rejected(request)
                elif len(kept) < count and item.record is not None:
                    kept.append(item.record)
    return kept, rejected


async def _one(engine: Engine, config: Config, request: Request) -> Item | str:
    sampling = config.sampling.body(request.index)
    try:
        completion = await engine.chat(
            request.messages,
            response_format=response_format(request.schema_name),
            sampling=sampling,
        )
    except EngineError:
        return "engine_error"
    return Item.answered(request, completion, engine, sampling)


def preview(
    config: Config, count: int, console: Console, *, card: str | None = None, attempts: int = 12
) -> list[Record]:
    """Generate up to ``count`` scenarios (at most ``attempts`` calls), print them, return them."""
    cards = CardSet.load(config.prompts, config.extra_cards)
    if card is not None:
        if card not in cards.by_id:
            raise PreviewError(f"no card {card!r}; cards: {', '.join(cards.by_id)}")
        cards = CardSet([cards.by_id[card]], cards.root)
    try:
        kept, rejected = asyncio.run(_collect(config, cards, count, attempts))
    except EngineError as exc:
        raise PreviewError(str(exc)) from None
    for record in kept:
        for line in render(record):
            console.print(line, soft_wrap=True, highlight=False)
        console.print()
    why = ", ".join(f"{k} {v}" for k, v in rejected.most_common()) or "none"
    console.print(
        f"{len(kept)} of {count} scenarios shown; rejected: {why}; nothing was written",
        highlight=False,
    )
    return kept
