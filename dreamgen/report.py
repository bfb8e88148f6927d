"""`dreamgen report OUT`: the plots of a build, as PNGs and one self-contained HTML file.

Written to ``OUT/report/`` (or ``--dest``): ``report.html`` with every image embedded (it
can be mailed or attached alone) beside the PNGs. Sources, all read-only: the manifest
(coverage with quotas, rejection counts, totals), the closed shards (streamed line by
line with orjson: difficulty, lengths, minimal pairs, judge scores), ``timeseries.jsonl``
(yield and tokens/s over the build's lifetime) and any probe/experiment plots found in
the folder (``probe.png``, ``compare.png``: the per-layer before/after of the probe).

matplotlib comes with the ``train`` extra; without it the command says so.
"""

from __future__ import annotations

import base64
import html
import itertools
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from dreamgen.dedup import Reason as DedupReason
from dreamgen.reader import closed_shards
from dreamgen.store import MANIFEST, SHARDS, StoreError
from dreamgen.timeseries import read_timeseries
from dreamgen.viewindex import judge_scores

REPORT = "report"
LENGTH_BUCKET = 50  # characters per histogram bin: bounded memory on any store size
PLOT_NAMES = ("probe.png", "compare.png")


class ReportError(Exception):
    """The report cannot be made (not an output folder, matplotlib missing)."""


class Stats:
    """What the report needs from the records, gathered in one streaming pass."""

    def __init__(self) -> None:
        self.records = 0
        self.unreadable = 0
        self.difficulty: Counter[int] = Counter()
        self.decision_chars: Counter[int] = Counter()  # bucketed lengths
        self.response_chars: Counter[int] = Counter()
        self.turns: Counter[int] = Counter()
        self.modes: Counter[str] = Counter()
        self.pairs: Counter[str] = Counter()
        self.judge: dict[str, list[float]] = defaultdict(list)

    def add(self, d: dict[str, Any]) -> None:
        self.records += 1
        self.difficulty[int(d.get("difficulty") or 0)] += 1
        messages = d.get("messages") or []
        if messages:
            self.decision_chars[len(messages[-1].get("content", "")) // LENGTH_BUCKET] += 1
        self.turns[len(messages)] += 1
        for key in ("target", "contrast"):
            content = (d.get(key) or {}).get("content", "")
            self.response_chars[len(content) // LENGTH_BUCKET] += 1
        self.modes[str(d.get("mode") or "directed")] += 1
        self.pairs[str(d.get("minimal_pair") or "(scenario)")] += 1
        quality = d.get("quality") or {}
        for k, v in (judge_scores(quality) or {}).items():
            self.judge[k].append(v)


def gather(out: Path) -> Stats:
    """Stream the closed shards once."""
    stats = Stats()
    for shard in closed_shards(out):
        with open(shard, "rb") as f:
            for line in f:
                try:
                    d = orjson.loads(line)
                except orjson.JSONDecodeError:
                    stats.unreadable += 1
                    continue
                if isinstance(d, dict):
                    stats.add(d)
                else:
                    stats.unreadable += 1
    return stats


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ReportError(
            f"the report needs matplotlib (pip install 'dreamgen[train]'): {exc}"
        ) from None
    return plt


def coverage_plot(plt: Any, coverage: list[dict[str, Any]], path: Path) -> bool:
    cells = [c for c in coverage if c.get("difficulty") != "*"]
    if not cells:
        return False
    import numpy as np

    cues = sorted({str(c["cue_kind"]) for c in cells})
    kinds = sorted({str(c["distractor_kind"]) for c in cells})
    levels = sorted({int(c["difficulty"]) for c in cells})
    fig, axes = plt.subplots(
        1, len(levels), figsize=(3.2 * len(levels) + 2, 0.45 * len(cues) + 2.2), squeeze=False
    )
    for ax, level in zip(axes[0], levels, strict=True):
        grid = np.full((len(cues), len(kinds)), np.nan)
        for c in cells:
            if int(c["difficulty"]) != level:
                continue
            quota, filled = c.get("quota"), int(c.get("filled") or 0)
            i, j = cues.index(str(c["cue_kind"])), kinds.index(str(c["distractor_kind"]))
            grid[i, j] = min(1.0, filled / quota) if quota else float(filled > 0)
            ax.text(
                j,
                i,
                f"{filled}/{quota}" if quota is not None else str(filled),
                ha="center",
                va="center",
                fontsize=6,
            )
        ax.imshow(grid, vmin=0, vmax=1, cmap="YlGn", aspect="auto")
        ax.set_title(f"difficulty {level}")
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(
            range(len(cues)), cues if level == levels[0] else [""] * len(cues), fontsize=7
        )
    fig.suptitle("coverage: filled / quota per cell (colour: share of quota)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _bars(plt: Any, path: Path, title: str, series: list[tuple[str, Counter[Any], str]]) -> bool:
    if not any(c for _, c, _ in series):
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (label, counts, xlabel) in zip(axes[0], series, strict=True):
        keys = sorted(counts)
        ax.bar(
            [str(k) for k in keys] if not all(isinstance(k, int) for k in keys) else keys,
            [counts[k] for k in keys],
        )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("records")
        if not any(counts.values()):  # say so, rather than draw empty axes around zero
            ax.set_yticks([])
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _lengths(counts: Counter[int]) -> Counter[int]:
    return Counter({k * LENGTH_BUCKET: v for k, v in counts.items()})


def pareto_plot(plt: Any, rejected: dict[str, int], path: Path) -> bool:
    items = sorted(((k, v) for k, v in rejected.items() if v), key=lambda kv: -kv[1])
    if not items:
        return False
    total = sum(v for _, v in items)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(items) + 2), 3.6))
    ax.bar([k for k, _ in items], [v for _, v in items], color="#c0504d")
    ax.set_ylabel("rejections")
    ax.tick_params(axis="x", labelrotation=45)
    share = ax.twinx()
    acc, cumulative = 0, []
    for _, v in items:
        acc += v
        cumulative.append(100 * acc / total)
    share.plot(range(len(items)), cumulative, marker="o", color="#333")
    share.set_ylim(0, 105)
    share.set_ylabel("cumulative %")
    ax.set_title(f"rejection reasons (Pareto), {total} in all")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def timeseries_plot(plt: Any, points: list[dict[str, Any]], path: Path) -> bool:
    """Per-interval yield and tokens/s between consecutive points of the same run."""
    xs: list[float] = []
    yields: list[float] = []
    tps: list[float] = []
    atps: list[float] = []
    t0 = points[0]["t"] if points else 0.0
    for a, b in itertools.pairwise(points):
        dt = b["t"] - a["t"]
        if b.get("run_started") != a.get("run_started") or dt <= 0:
            continue  # a new run starts its counters at zero
        dreq = b.get("requests", 0) - a.get("requests", 0)
        xs.append((b["t"] - t0) / 60)
        yields.append(
            (b.get("accepted", 0) - a.get("accepted", 0)) / dreq if dreq else float("nan")
        )
        tps.append((b.get("completion_tokens", 0) - a.get("completion_tokens", 0)) / dt)
        atps.append((b.get("accepted_tokens", 0) - a.get("accepted_tokens", 0)) / dt)
    if not xs:
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 4.8), sharex=True)
    ax1.plot(xs, yields, marker=".")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("yield (accepted / requests)")
    ax2.plot(xs, tps, marker=".", label="generated tok/s")
    ax2.plot(xs, atps, marker=".", label="accepted tok/s")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("minutes since the first point")
    ax2.legend(fontsize=8)
    fig.suptitle("over the build's lifetime")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def judge_plot(plt: Any, judge: dict[str, list[float]], path: Path) -> bool:
    if not judge:
        return False
    names = sorted(judge)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.hist(judge[name], bins=20)
        ax.set_title(name, fontsize=9)
    fig.suptitle("judge scores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_report(out: Path, dest: Path | None = None) -> Path:
    """Write the PNGs and ``report.html`` for ``out``; returns the HTML file's path."""
    out = Path(out)
    if not (out / SHARDS).is_dir():
        raise ReportError(f"{out} is not a dreamgen output folder (it has no {SHARDS}/)")
    plt = _pyplot()
    dest = Path(dest) if dest is not None else out / REPORT
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot write the report to {dest}: {exc.strerror or exc}") from exc
    notes: list[str] = []
    try:
        manifest = orjson.loads((out / MANIFEST).read_bytes())
    except FileNotFoundError:
        manifest = {}
        notes.append("no manifest.json: coverage, rejections and totals are not shown")
    except (OSError, orjson.JSONDecodeError) as exc:
        manifest = {}
        notes.append(f"manifest.json cannot be read ({exc}): coverage and totals not shown")
    try:
        stats = gather(out)
    except OSError as exc:
        raise StoreError(f"cannot read the shards of {out}: {exc}") from exc
    if stats.unreadable:
        notes.append(f"{stats.unreadable} shard lines are not JSON and were skipped")
    totals = manifest.get("totals") or {}
    rejected: dict[str, int] = totals.get("rejected") or {}
    dedup = Counter({r.value: int(rejected.get(r.value, 0)) for r in DedupReason})
    sections: list[tuple[str, str, bool]] = [
        (
            "coverage",
            "coverage heatmap per difficulty",
            coverage_plot(plt, manifest.get("coverage") or [], dest / "coverage.png"),
        ),
        (
            "distributions",
            "difficulty and lengths",
            _bars(
                plt,
                dest / "distributions.png",
                "records",
                [
                    ("difficulty", stats.difficulty, "difficulty (1 broad – 5 subtle)"),
                    ("decision turn", _lengths(stats.decision_chars), "characters"),
                    ("responses", _lengths(stats.response_chars), "characters"),
                    ("context turns", stats.turns, "messages"),
                ],
            ),
        ),
        ("rejections", "rejection reasons", pareto_plot(plt, rejected, dest / "rejections.png")),
        (
            "timeseries",
            "yield and tokens/s over time",
            timeseries_plot(plt, read_timeseries(out), dest / "timeseries.png"),
        ),
        ("judge", "judge score distributions", judge_plot(plt, stats.judge, dest / "judge.png")),
        (
            "dedup_pairs",
            "dedup hits and minimal pairs",
            _bars(
                plt,
                dest / "dedup_pairs.png",
                "dedup and minimal pairs",
                [
                    ("dedup hits (rejections)", dedup, "reason"),
                    ("records by minimal pair kind", stats.pairs, "kind"),
                    ("records by mode", stats.modes, "mode"),
                ],
            ),
        ),
    ]
    found = sorted(
        p
        for name in PLOT_NAMES
        for p in out.glob(f"**/{name}")
        if SHARDS not in p.parts and dest not in p.parents
    )
    html_path = dest / "report.html"
    html_path.write_text(_html(out, manifest, stats, sections, found, dest, notes))
    return html_path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' style='max-width:100%'>"


def _html(
    out: Path,
    manifest: dict[str, Any],
    stats: Stats,
    sections: list[tuple[str, str, bool]],
    found: list[Path],
    dest: Path,
    notes: list[str],
) -> str:
    e = html.escape
    totals = manifest.get("totals") or {}
    facts = [
        ("folder", str(out)),
        ("records", stats.records),
        ("state", manifest.get("state", "?")),
        ("requests", totals.get("requests", "?")),
        ("completion tokens", totals.get("completion_tokens", "?")),
        ("accepted tokens", totals.get("accepted_tokens", "?")),
        ("rejected answers kept to look at", sum((manifest.get("rejected_sample") or {}).values())),
    ]
    rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in facts)
    parts = [f"<p style='background:#fff3cd'>{e(n)}</p>" for n in notes]
    for name, title, made in sections:
        body = _img(dest / f"{name}.png") if made else "<p><i>no data for this plot</i></p>"
        parts.append(f"<h2 id='{name}'>{e(title)}</h2>{body}")
    for p in found:
        parts.append(f"<h2>probe / experiment: {e(str(p.relative_to(out)))}</h2>{_img(p)}")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>dreamgen report</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:20px;max-width:1100px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>dreamgen report</h1><table>{rows}</table>{''.join(parts)}</body></html>"
    )


def coverage_grid(coverage: list[dict[str, Any]]) -> Any:
    """A compact coverage table for a terminal: cue kind × difficulty, filled / quota summed
    over distractor kinds (``dreamgen coverage`` prints every cell)."""
    from rich.table import Table

    sums: dict[tuple[str, Any], list[int | None]] = {}
    levels: list[Any] = []
    for c in coverage:
        key = (str(c["cue_kind"]), c["difficulty"])
        if c["difficulty"] not in levels:
            levels.append(c["difficulty"])
        filled, quota = sums.setdefault(key, [0, 0])
        q = c.get("quota")
        sums[key] = [
            (filled or 0) + int(c.get("filled") or 0),
            None if q is None or quota is None else quota + int(q),
        ]
    table = Table(title="coverage (filled / quota, summed over distractor kinds)")
    table.add_column("cue_kind")
    for level in levels:
        table.add_column(f"d{level}" if level != "*" else "*", justify="right")
    for cue in dict.fromkeys(k for k, _ in sums):
        cells = []
        for level in levels:
            got = sums.get((cue, level))
            cells.append("" if got is None else f"{got[0]}/{'?' if got[1] is None else got[1]}")
        table.add_row(cue, *cells)
    return table
