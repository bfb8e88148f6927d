"""How much attention a model puts on direction cues at the decision point.

For each conversation (a Record or a labelled line) the prompt is run once, up to and
including the decision position: the query of the first generated token under the model's
own chat template (``dreamgen.decision``). For every layer and head, that query's attention
row is split over the disjoint position groups of ``decision.GROUPS``: attention sinks (the
first few positions, kept apart), cue tokens, distractor tokens, their position-matched
controls (the other tokens of the same messages) and the rest; the parts sum to 1.

Per conversation and layer (head means) the derived measures are:

- ``direction_share`` = cue / (cue + distractor), both per token: 0.5 is "no preference";
  undefined (left out, never NaN) for a conversation without distractor tokens;
- ``control_lift`` = ln(cue per token / cue-control per token): how much more a cue token
  gets than the other tokens of its own message; 0 is "no lift";
- ``<group>_mass`` and ``<group>_per_token``.

``compare`` pairs two probes by conversation id and puts percentile-bootstrap 95% CIs
(resampling conversations) on each change, per layer and overall (the mean over layers).

Attention rows are taken by forward hooks on each ``*.self_attn`` module under the eager
attention implementation, one layer at a time, so memory stays at one layer's matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dreamgen.decision import (
    DEFAULT_SINK_TOKENS,
    GROUPS,
    Conversation,
    as_conversations,
    decision_inputs,
    read_conversations,
)
from dreamgen.labelled import Labelled
from dreamgen.record import Record
from dreamgen.training import load_model

Matrix = list[list[float]]
OptMatrix = list[list[float | None]]
# The measures compare() reports, in order; the first two are the experiment's headline.
METRICS = (
    "direction_share",
    "control_lift",
    "distractor_lift",
    *(f"{g}_per_token" for g in GROUPS),
    *(f"{g}_mass" for g in GROUPS),
)

__all__ = ["GROUPS", "METRICS", "CompareResult", "ProbeResult", "compare", "load_model", "probe"]


class ProbeResult(BaseModel):
    """The decision query's attention over the position groups, per conversation and layer.

    ``mass[group]`` is ``[layer][head]``, averaged over conversations; ``record_mass[group]``
    is ``[conversation][layer]``, averaged over heads; ``counts[group]`` the number of
    positions in the group per conversation.
    """

    model: str
    n_records: int
    num_layers: int
    num_heads: int
    sink_tokens: int
    record_ids: list[str]
    record_tokens: list[int]
    counts: dict[str, list[int]]
    mass: dict[str, Matrix]
    record_mass: dict[str, Matrix]

    def per_token(self, group: str) -> OptMatrix:
        """``[conversation][layer]`` mass per position of ``group`` (None: no position)."""
        return [
            [m / n if n else None for m in row]
            for row, n in zip(self.record_mass[group], self.counts[group], strict=True)
        ]

    def record_metric(self, name: str) -> OptMatrix:
        """``[conversation][layer]`` values of one of ``METRICS`` (None where undefined)."""
        if name.endswith("_mass"):
            return [list(row) for row in self.record_mass[name.removesuffix("_mass")]]
        if name.endswith("_per_token"):
            return self.per_token(name.removesuffix("_per_token"))
        pairs = {
            "direction_share": ("cue", "distractor"),
            "control_lift": ("cue", "cue_control"),
            "distractor_lift": ("distractor", "distractor_control"),
        }
        if name not in pairs:
            raise ValueError(f"unknown probe measure {name!r}; known: {', '.join(METRICS)}")
        top, other = (self.per_token(g) for g in pairs[name])
        share = name == "direction_share"
        return [
            [
                None
                if a is None or b is None or a <= 0 or b <= 0
                else (a / (a + b) if share else math.log(a / b))
                for a, b in zip(ra, rb, strict=True)
            ]
            for ra, rb in zip(top, other, strict=True)
        ]

    def layer_mean(self, name: str) -> list[float | None]:
        """One of ``METRICS`` per layer, averaged over the conversations where it is defined."""
        rows = self.record_metric(name)
        out: list[float | None] = []
        for layer in range(self.num_layers):
            vals = [row[layer] for row in rows if row[layer] is not None]
            out.append(sum(v for v in vals if v is not None) / len(vals) if vals else None)
        return out

    def write(self, out_dir: str | Path) -> Path:
        """Write ``probe.json`` and ``probe.png`` (heatmaps of cue and distractor mass)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(self.model_dump_json(indent=1))
        from dreamgen.plots import probe_heatmap

        probe_heatmap(self, out / "probe.png")
        return out / "probe.json"


class Change(BaseModel):
    """A paired before/after change (after - before) with a bootstrap 95% CI over ``n``
    conversations; all None when the measure is defined for none."""

    before: float | None
    after: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


class LayerChange(Change):
    """One layer's change."""

    layer: int


class MetricChange(Change):
    """The overall change (the mean over layers, per conversation) and each layer's."""

    per_layer: list[LayerChange]


class CompareResult(BaseModel):
    """Per-measure before/after changes, paired over conversations."""

    before: str
    after: str
    n_records: int
    n_boot: int
    metrics: dict[str, MetricChange]

    def write(self, out_dir: str | Path, plot: bool = True) -> Path:
        """Write ``compare.json`` (and ``compare.png``: per-layer measures with CIs)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(self.model_dump_json(indent=1))
        if plot:
            from dreamgen.plots import compare_plot

            compare_plot(self, out / "compare.png")
        return out / "compare.json"


def _attention_modules(model: Any) -> list[Any]:
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not modules:
        raise ValueError(f"no '*.self_attn' modules in {type(model).__name__}: cannot probe it")
    return modules


def _set_eager(model: Any) -> str | None:
    """Switch to eager attention (the only one that returns weights); return the old one."""
    old: str | None = model.config._attn_implementation
    if old != "eager":
        model.set_attn_implementation("eager")
    return old


def probe(
    model: Any,
    items: Iterable[Record | Labelled | Conversation],
    *,
    tokenizer: Any = None,
    limit: int | None = None,
    device: str = "cpu",
    name: str | None = None,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
) -> ProbeResult:
    """Measure the decision query's attention over the position groups.

    ``model`` is an HF name, a local folder, a ``.gguf`` path, ``"smollm2"``, or a loaded
    causal LM (then ``tokenizer`` is required and ``device`` is ignored: the model stays
    where it is). At most ``limit`` conversations are used.
    """
    import torch

    if isinstance(model, str | Path):
        name = name or str(model)
        model, loaded_tok = load_model(model, device=device)
        tokenizer = tokenizer or loaded_tok
    elif tokenizer is None:
        raise ValueError("probe(model=<loaded model>) needs tokenizer=")
    name = name or str(model.name_or_path or type(model).__name__)
    device = str(next(model.parameters()).device)
    convs = as_conversations(items)[:limit]
    if not convs:
        raise ValueError("probe got no conversations")

    rows: list[torch.Tensor] = []

    def hook(_module: Any, _args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("attention weights unavailable: the model is not running eager")
        rows.append(weights[0, :, -1, :].float())  # [heads, keys]: the decision query's row

    was_training = model.training
    old_impl = _set_eager(model)
    handles = [m.register_forward_hook(hook) for m in _attention_modules(model)]
    masses: list[torch.Tensor] = []  # each [groups, layers, heads]
    counts: list[list[int]] = []
    lengths: list[int] = []
    try:
        model.eval()
        for conv in convs:
            inputs = decision_inputs(conv, tokenizer, sink_tokens=sink_tokens)
            groups = torch.tensor(inputs.groups, device=device)
            rows.clear()
            with torch.inference_mode():
                model(input_ids=torch.tensor([inputs.input_ids], device=device), use_cache=False)
            att = torch.stack(rows)  # [layers, heads, keys]
            masses.append(
                torch.stack([att[..., groups == g].sum(-1) for g in range(len(GROUPS))]).cpu()
            )
            counts.append([inputs.count(g) for g in GROUPS])
            lengths.append(len(inputs.input_ids))
    finally:
        for handle in handles:
            handle.remove()
        if old_impl is not None and old_impl != "eager":
            model.set_attn_implementation(old_impl)
        model.train(was_training)

    stacked = torch.stack(masses).double()  # [conversations, groups, layers, heads]
    mean = stacked.mean(0)
    by_record = stacked.mean(-1)  # head means: [conversations, groups, layers]
    return ProbeResult(
        model=name,
        n_records=len(convs),
        num_layers=int(stacked.shape[2]),
        num_heads=int(stacked.shape[3]),
        sink_tokens=sink_tokens,
        record_ids=[c.id for c in convs],
        record_tokens=lengths,
        counts={g: [c[i] for c in counts] for i, g in enumerate(GROUPS)},
        mass={g: mean[i].tolist() for i, g in enumerate(GROUPS)},
        record_mass={g: by_record[:, i].tolist() for i, g in enumerate(GROUPS)},
    )


def compare(
    before: ProbeResult,
    after: ProbeResult,
    n_boot: int = 2000,
    seed: int = 0,
    metrics: Iterable[str] = METRICS,
) -> CompareResult:
    """Per-measure change (after - before), paired by conversation id.

    The 95% CIs are percentile bootstraps that resample conversations with replacement,
    ``n_boot`` times; a measure's ``n`` counts the conversations where it is defined.
    """
    import numpy as np

    index_after = {rid: i for i, rid in enumerate(after.record_ids)}
    pairs = [(i, index_after[rid]) for i, rid in enumerate(before.record_ids) if rid in index_after]
    if not pairs:
        raise ValueError("the two probe results share no conversation ids")
    if before.num_layers != after.num_layers:
        raise ValueError(f"layer counts differ: {before.num_layers} vs {after.num_layers}")
    bi, ai = (list(x) for x in zip(*pairs, strict=True))
    rng = np.random.default_rng(seed)
    out: dict[str, MetricChange] = {}
    for name in metrics:
        b = _array(before.record_metric(name))[bi]  # [conversations, layers], NaN: undefined
        a = _array(after.record_metric(name))[ai]
        ok = np.isfinite(b).all(1) & np.isfinite(a).all(1)
        b, a = b[ok], a[ok]
        # the overall column: each conversation's mean over layers
        b, a = np.column_stack([b, b.mean(1)]), np.column_stack([a, a.mean(1)])
        changes = _changes(b, a, rng, n_boot)
        out[name] = MetricChange(
            **changes[-1].model_dump(),
            per_layer=[LayerChange(layer=i, **c.model_dump()) for i, c in enumerate(changes[:-1])],
        )
    return CompareResult(
        before=before.model, after=after.model, n_records=len(pairs), n_boot=n_boot, metrics=out
    )


def _array(rows: OptMatrix) -> Any:
    import numpy as np

    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)


def _changes(b: Any, a: Any, rng: Any, n_boot: int) -> list[Change]:
    """One ``Change`` per column of the paired ``[n, columns]`` arrays."""
    import numpy as np

    n, columns = b.shape
    if n == 0:
        return [Change(before=None, after=None, diff=None, ci_low=None, ci_high=None, n=0)] * (
            columns
        )
    diff = a - b
    boot = diff[rng.integers(0, n, size=(n_boot, n))].mean(1)  # [n_boot, columns]
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return [
        Change(
            before=float(b[:, c].mean()),
            after=float(a[:, c].mean()),
            diff=float(diff[:, c].mean()),
            ci_low=float(low[c]),
            ci_high=float(high[c]),
            n=n,
        )
        for c in range(columns)
    ]


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-".rjust(len(format(0.0, spec)))


def format_probe(result: ProbeResult) -> str:
    """A per-layer table: sink, cue, distractor, control masses (head means), share, lift."""
    lines = [
        f"probe {result.model}: {result.n_records} conversations",
        "layer   sink    cue  distr  c-ctl  share   lift",
    ]
    cols = [result.layer_mean(f"{g}_mass") for g in ("sink", "cue", "distractor", "cue_control")]
    share, lift = result.layer_mean("direction_share"), result.layer_mean("control_lift")
    for layer in range(result.num_layers):
        cells = [_fmt(c[layer], "6.3f") for c in cols]
        cells += [_fmt(share[layer], "6.3f"), _fmt(lift[layer], "+6.2f")]
        lines.append(f"{layer:5d} " + " ".join(cells))
    return "\n".join(lines)


def format_compare(result: CompareResult, names: Iterable[str] = METRICS[:2]) -> str:
    """Per-layer before/after, change and 95% CI of the headline measures."""
    lines = [f"compare {result.before} -> {result.after}: {result.n_records} conversations"]
    for name in names:
        metric = result.metrics[name]
        lines.append(f"{name} (n={metric.n})   before    after     diff  [95% CI]")
        for row, label in [*((r, str(r.layer)) for r in metric.per_layer), (metric, "all")]:
            lines.append(
                f"{label:>5} {_fmt(row.before, '9.4f')} {_fmt(row.after, '9.4f')}"
                f" {_fmt(row.diff, '+9.4f')}  [{_fmt(row.ci_low, '+.4f')}, "
                f"{_fmt(row.ci_high, '+.4f')}]"
            )
    return "\n".join(lines)


def probe_cli(
    model: str,
    data: Path,
    out: Path,
    limit: int,
    compare_model: str | None = None,
    qproj: Path | None = None,
) -> tuple[ProbeResult, CompareResult | None]:
    """``dreamgen probe``: probe ``model`` (plus trained query projections from ``qproj``)
    on ``data`` (labelled JSONL, Record JSONL or an output folder) and write
    ``out/probe.json`` + ``out/probe.png``. With ``compare_model`` (the "after": another
    model, or a ``.safetensors`` q_proj file applied on top of ``model``) also probe it into
    ``out/compare_model/`` and write ``out/compare.json``. Prints the per-layer tables."""
    from dreamgen.qproj import apply_qproj

    convs = read_conversations(data)[:limit]
    if not convs:
        raise ValueError(f"no conversations in {data}")
    loaded, tokenizer = load_model(model)
    if qproj is not None:
        apply_qproj(loaded, qproj)
    name = f"{model} + {qproj}" if qproj else model
    before = probe(loaded, convs, tokenizer=tokenizer, name=name)
    before.write(out)
    print(format_probe(before))
    if compare_model is None:
        return before, None
    if compare_model.endswith(".safetensors"):
        apply_qproj(loaded, Path(compare_model))
        after_model, after_name = loaded, f"{model} + {compare_model}"
    else:
        after_model, tokenizer = load_model(compare_model)
        after_name = compare_model
    after = probe(after_model, convs, tokenizer=tokenizer, name=after_name)
    after.write(Path(out) / "compare_model")
    result = compare(before, after)
    result.write(out)
    print(format_compare(result))
    return before, result
