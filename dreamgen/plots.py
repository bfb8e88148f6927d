"""PNG figures for probes, comparisons and training losses (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dreamgen.probe import CompareResult, ProbeResult


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in servers and CI
    import matplotlib.pyplot as plt

    return plt


def probe_heatmap(result: ProbeResult, path: Path) -> None:
    """Cue, distractor and sink mass per layer and head."""
    plt = _pyplot()
    panels = ("cue", "distractor", "sink")
    fig, axes = plt.subplots(1, 3, figsize=(13, max(4.0, result.num_layers * 0.22)))
    for ax, group in zip(axes, panels, strict=True):
        image = ax.imshow(result.mass[group], aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(f"{group} mass")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"{result.model} ({result.n_records} conversations)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def compare_plot(
    result: CompareResult,
    path: Path,
    names: Sequence[str] = ("direction_share", "control_lift"),
) -> None:
    """Per layer: before and after (top), and the change with its 95% CI (bottom)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        metric = result.metrics[name]
        rows = [r for r in metric.per_layer if r.diff is not None]
        layers = [r.layer for r in rows]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(layers, [r.before for r in rows], "o-", label="before", markersize=3)
        top.plot(layers, [r.after for r in rows], "o-", label="after", markersize=3)
        top.set_title(f"{name} (n={metric.n})")
        top.set_xlabel("layer")
        top.legend()
        diffs = [r.diff or 0.0 for r in rows]
        bottom.fill_between(
            layers, [r.ci_low or 0.0 for r in rows], [r.ci_high or 0.0 for r in rows], alpha=0.3
        )
        bottom.plot(layers, diffs, "o-", markersize=3)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_title(f"{name}: after - before, 95% CI")
        bottom.set_xlabel("layer")
    fig.suptitle(f"{result.before} -> {result.after}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def loss_plot(losses: Sequence[float], path: Path, title: str) -> None:
    """The training loss per step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, "o-", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
