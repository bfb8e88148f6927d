"""The dataset card (``README.md``) written beside every export.

Its YAML header is what the Hugging Face Hub and ``datasets.load_dataset(folder)`` read:
the split files, so the folder loads as a ``DatasetDict`` with ``train``/``eval``/``probe``
kept apart. The body says what the data is: the taxonomy, counts, coverage, yield and
rejection reasons of the build, the model and its sampling, the config fingerprint and a
licence note. Counts come from the exported records themselves; yield, rejections and
coverage quotas come from the source folder's manifest (absent for a bare JSONL source).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dreamgen.record import Record
from dreamgen.taxonomy import DESCRIPTIONS, CueKind, DistractorKind
from dreamgen.version import __version__

CARD = "README.md"
SPLITS = ("train", "eval", "probe")

FORMAT_NOTES = {
    "trl-sft": "TRL conversational prompt-completion: `prompt` (context) → `completion` "
    "(`[target]`); `SFTTrainer` puts the loss on the completion only.",
    "trl-dpo": "TRL conversational preference: `prompt`, `chosen` (`[target]`), "
    "`rejected` (`[contrast]`), for `DPOTrainer`.",
    "sharegpt": "ShareGPT turns (`from`/`value`): `conversations` is the context with the "
    "target appended (SFT; `train` is true on the target turn only); `prompt`, `chosen`, "
    "`rejected` for preference trainers.",
    "openai-chat": "OpenAI chat fine-tuning rows: `messages` is the whole conversation with "
    "the target as its last assistant turn; ids and spans are in `SPLIT.spans.jsonl`.",
    "hf": "A `datasets.DatasetDict` (`load_from_disk`), columns of `trl-dpo` plus "
    "`completion`; the same rows as per-split JSONL.",
}


def _header(fmt: str, counts: dict[str, int], model: str) -> dict[str, Any]:
    files = [{"split": s, "path": f"{s}.jsonl"} for s in SPLITS if counts.get(s)]
    return {
        "license": "other",
        "license_name": "see-licence-note",
        "pretty_name": "dreamgen decision-point conversations",
        "language": ["en"],
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "dreamgen", f"format:{fmt}", f"model:{model}"],
        "size_categories": [_size(sum(counts.values()))],
        "configs": [{"config_name": "default", "data_files": files}],
    }


def _size(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "n>100K"


def _table(head: list[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _coverage(manifest: dict[str, Any], records: list[Record]) -> str:
    """Filled / quota per (cue kind, distractor kind), summed over difficulty."""
    filled: Counter[tuple[str, str]] = Counter(
        (r.axes.cue_kind, r.axes.distractor_kind) for r in records if r.mode != "minimal_pair"
    )
    quota: Counter[tuple[str, str]] = Counter()
    for row in manifest.get("coverage", []):
        if isinstance(row, dict) and isinstance(row.get("quota"), int):
            quota[(str(row["cue_kind"]), str(row["distractor_kind"]))] += row["quota"]
    cells = sorted(set(filled) | {k for k, v in quota.items() if v})
    rows = [[c, d, filled[(c, d)], quota.get((c, d), "")] for c, d in cells]
    return _table(["cue kind", "distractor kind", "records", "quota"], rows)


def _taxonomy() -> str:
    cues = [[k.value, DESCRIPTIONS.get(k.value, "")] for k in CueKind]
    dists = [[k.value, DESCRIPTIONS.get(k.value, "")] for k in DistractorKind]
    return (
        "Cue kinds (how the user gives direction):\n\n"
        + _table(["cue kind", "meaning"], cues)
        + "\n\nDistractor kinds (what pulls the assistant off it):\n\n"
        + _table(["distractor kind", "meaning"], dists)
    )


def render_card(
    fmt: str, source: Path, records: list[Record], counts: dict[str, int], manifest: dict[str, Any]
) -> str:
    """The card's text (YAML header + Markdown body)."""
    config = manifest.get("config", {}) if isinstance(manifest.get("config"), dict) else {}
    models = Counter(r.provenance.model for r in records)
    model = str(config.get("model") or models.most_common(1)[0][0])
    totals = manifest.get("totals", {}) if isinstance(manifest.get("totals"), dict) else {}
    requests = totals.get("requests")
    rejected: dict[str, int] = totals.get("rejected", {}) or {}
    scenarios = sum(r.mode != "minimal_pair" for r in records)
    yield_line = (
        f"{scenarios} accepted scenarios from {requests} model requests "
        f"(yield {scenarios / requests:.1%})"
        if isinstance(requests, int) and requests
        else "not recorded (the source has no manifest totals)"
    )
    difficulty = Counter(r.difficulty for r in records)
    modes = Counter(r.mode for r in records)
    header = yaml.safe_dump(_header(fmt, counts, model), sort_keys=False)
    parts = [
        f"---\n{header}---\n",
        "# dreamgen decision-point conversations\n",
        "Synthetic conversations that stop at a **decision point**: the user has just given "
        "direction and the assistant is tempted by its own idea. `target` is the listening "
        "response, `contrast` the reflex one. Every direction cue and distractor has exact "
        "character offsets. Made by [dreamgen](https://pypi.org/project/dreamgen/) "
        f"{__version__} from `{source.name}`.\n",
        f"## Format: `{fmt}`\n\n{FORMAT_NOTES[fmt]}\n",
        "Spans (`cues`, `distractors`): `{message, start, end, kind, text}` with "
        "`text == content[start:end]`; `message` indexes the context messages followed by "
        "the target and then the contrast.\n",
        "> **No `messages` column holds the context alone.** A record's context ends at the "
        "user's decision turn: a trainer that trains on a context-only `messages` column "
        "never sees the target. The context is called `prompt` here.\n",
        "## Splits\n\n"
        + _table(["split", "rows"], [[s, counts.get(s, 0)] for s in SPLITS])
        + "\n\nSplits are assigned per `group_id`: a scenario, its evolutions and its "
        "minimal pairs always share a split. `probe` is held out for attention probing.\n",
        "## Composition\n\n"
        + _table(["mode", "rows"], sorted(modes.items()))
        + "\n\n"
        + _table(["difficulty", "rows"], sorted(difficulty.items()))
        + "\n",
        "## Coverage\n\n" + _coverage(manifest, records) + "\n",
        "## Yield and rejections\n\n"
        + yield_line
        + ".\n\n"
        + (
            _table(["rejection reason", "count"], sorted(rejected.items()))
            if rejected
            else "No rejections recorded."
        )
        + "\n",
        "## Model and sampling\n\n"
        + _table(["model", "records"], models.most_common())
        + "\n\n```yaml\n"
        + yaml.safe_dump(
            {
                "engine": config.get("engine", ""),
                "sampling": config.get("sampling", {}),
                "plan": config.get("plan", {}),
            },
            sort_keys=False,
        )
        + "```\n\nConfig fingerprint: `"
        + str(manifest.get("fingerprint", "(none: no manifest)"))
        + "` (the same fingerprint means the same data config, cards and prompts).\n",
        "## Taxonomy\n\n" + _taxonomy() + "\n",
        "## Licence\n\n"
        "The text was generated by the model(s) above; their licence and terms of use "
        "apply to their outputs where they say so (SmolLM2-135M-Instruct: Apache-2.0). "
        "The seed cards and prompts are dreamgen's. Set `license` in the header before "
        "publishing. The data is synthetic: check it before training on it.\n",
    ]
    return "\n".join(parts)


def write_card(
    dest: Path, fmt: str, source: Path, records: list[Record], counts: dict[str, int],
    manifest: dict[str, Any],
) -> Path:  # fmt: skip
    """Write ``dest/README.md``; returns its path."""
    path = dest / CARD
    path.write_text(render_card(fmt, source, records, counts, manifest), encoding="utf-8")
    return path
