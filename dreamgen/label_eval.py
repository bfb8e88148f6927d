"""``dreamgen label-eval PRED GOLD``: how well predicted labels match hand-written ones.

Predictions are matched to gold conversations by their messages (roles and contents,
exactly), so ids need not agree; a gold conversation with no prediction is counted as
``missing`` and scores nothing, a prediction with no gold is ``unmatched`` and ignored.

Measures, over the matched conversations (cues and distractors kept apart: a cue
character only matches a cue character):
- **span** precision/recall/F1 on character overlap: labelled characters
  ``(conversation, message, offset)`` predicted vs gold, micro-averaged;
- **exact segment**: a predicted span equals a gold span in the same message once both
  are trimmed of surrounding whitespace and ``"'.,;:!?`` (F1 over spans);
- **kind accuracy**: of the gold spans that some predicted span overlaps, the share whose
  most-overlapping prediction has the gold kind;
- **no-direction accuracy**: the share of conversations whose ``no_direction`` verdict
  is the gold one;
- per cue kind: gold spans, character recall, exact matches, overlap hits, right kind.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from dreamgen.labelled import Labelled, LabelledSpan, read_labelled

_TRIM = " \t\n\r\"'.,;:!?"


def _key(item: Labelled) -> bytes:
    return orjson.dumps([(m.role, m.content) for m in item.messages])


def _trimmed(item: Labelled, span: LabelledSpan) -> tuple[int, int, int]:
    text = item.messages[span.message].content
    s, e = span.start, span.end
    while s < e and text[s] in _TRIM:
        s += 1
    while e > s and text[e - 1] in _TRIM:
        e -= 1
    return span.message, s, e


def _prf(hit_p: int, n_p: int, hit_r: int, n_r: int) -> dict[str, float]:
    p = hit_p / n_p if n_p else (1.0 if not n_r else 0.0)
    r = hit_r / n_r if n_r else (1.0 if not n_p else 0.0)
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


@dataclass
class _Side:
    """Running counts for one side (cues or distractors)."""

    pred_chars: int = 0
    gold_chars: int = 0
    hit_chars: int = 0
    pred_spans: int = 0
    gold_spans: int = 0
    exact_pred: int = 0
    exact_gold: int = 0
    overlapped: int = 0
    right_kind: int = 0

    def add(
        self,
        pred: Labelled,
        pred_spans: list[LabelledSpan],
        gold: Labelled,
        gold_spans: list[LabelledSpan],
        per_kind: dict[str, Counter[str]] | None,
    ) -> None:
        pc = {(s.message, i) for s in pred_spans for i in range(s.start, s.end)}
        gc = {(s.message, i) for s in gold_spans for i in range(s.start, s.end)}
        self.pred_chars += len(pc)
        self.gold_chars += len(gc)
        self.hit_chars += len(pc & gc)
        self.pred_spans += len(pred_spans)
        self.gold_spans += len(gold_spans)
        pt = {_trimmed(pred, s) for s in pred_spans}
        gt = {_trimmed(gold, s) for s in gold_spans}
        self.exact_pred += sum(t in gt for t in pt)
        for g in gold_spans:
            exact = _trimmed(gold, g) in pt
            self.exact_gold += exact
            best, kind = 0, None
            for p in pred_spans:
                if p.message == g.message:
                    overlap = min(p.end, g.end) - max(p.start, g.start)
                    if overlap > best:
                        best, kind = overlap, p.kind
            self.overlapped += kind is not None
            self.right_kind += kind == g.kind
            if per_kind is not None:
                row = per_kind[g.kind]
                row["gold"] += 1
                row["gold_chars"] += g.end - g.start
                row["hit_chars"] += len({(g.message, i) for i in range(g.start, g.end)} & pc)
                row["exact"] += exact
                row["overlapped"] += kind is not None
                row["right_kind"] += kind == g.kind

    def report(self) -> dict[str, Any]:
        return {
            "span": _prf(self.hit_chars, self.pred_chars, self.hit_chars, self.gold_chars),
            "exact_segment": _prf(
                self.exact_pred, self.pred_spans, self.exact_gold, self.gold_spans
            ),
            "kind_accuracy": _ratio(self.right_kind, self.overlapped),
            "counts": {
                "pred_spans": self.pred_spans,
                "gold_spans": self.gold_spans,
                "pred_chars": self.pred_chars,
                "gold_chars": self.gold_chars,
                "overlapped_gold_spans": self.overlapped,
            },
        }


def _merge(a: _Side, b: _Side) -> _Side:
    return _Side(**{k: getattr(a, k) + getattr(b, k) for k in vars(a)})


def evaluate(pred: Iterable[Labelled], gold: Iterable[Labelled]) -> dict[str, Any]:
    """Compare predictions with gold; the returned dict is what ``--json`` writes."""
    golds: dict[bytes, Labelled] = {}
    for g in gold:
        golds.setdefault(_key(g), g)
    preds: dict[bytes, Labelled] = {}
    unmatched = 0
    for p in pred:
        k = _key(p)
        if k in golds:
            preds.setdefault(k, p)
        else:
            unmatched += 1
    cues, distractors = _Side(), _Side()
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    nd_right = matched = 0
    for k, g in golds.items():
        if k not in preds:
            continue
        p = preds[k]
        matched += 1
        nd_right += p.no_direction == g.no_direction
        cues.add(p, list(p.cues), g, list(g.cues), per_kind)
        distractors.add(p, list(p.distractors), g, list(g.distractors), None)
    both = _merge(cues, distractors)
    overall = both.report()
    kinds = {}
    for kind, row in sorted(per_kind.items()):
        kinds[kind] = {
            **row,
            "char_recall": round(row["hit_chars"] / row["gold_chars"], 4),
            "kind_accuracy": _ratio(row["right_kind"], row["overlapped"]),
        }
    return {
        "span_f1": overall["span"]["f1"],
        "exact_segment": overall["exact_segment"]["f1"],
        "kind_accuracy": overall["kind_accuracy"],
        "no_direction_accuracy": round(nd_right / matched, 4) if matched else 0.0,
        "n": matched,
        "gold": len(golds),
        "missing": len(golds) - matched,
        "unmatched": unmatched,
        "overall": overall,
        "cues": cues.report(),
        "distractors": distractors.report(),
        "per_cue_kind": kinds,
    }


def headline(result: dict[str, Any]) -> str:
    """The one-line summary ``label-eval`` ends with."""
    return (
        f"span_f1={result['span_f1']:.4f} exact_segment={result['exact_segment']:.4f} "
        f"kind_accuracy={result['kind_accuracy']:.4f} "
        f"no_direction_accuracy={result['no_direction_accuracy']:.4f} n={result['n']}"
    )


def labelled_path(path: Path) -> Path:
    """A ``dreamgen label`` output folder stands for its ``labelled.jsonl``."""
    return path / "labelled.jsonl" if path.is_dir() else path


def evaluate_files(pred: Path, gold: Path) -> dict[str, Any]:
    """``evaluate`` over two JSONL files (or label output folders); bad lines raise."""
    return evaluate(read_labelled(labelled_path(pred)), read_labelled(labelled_path(gold)))


def tables(result: dict[str, Any]) -> list[Table]:
    """The terminal view of a result: overall and per side, then per cue kind."""
    main = Table(title=f"label-eval (n={result['n']}, missing={result['missing']})")
    for col in ("", "span P", "span R", "span F1", "exact F1", "kind acc", "pred", "gold"):
        main.add_column(col, justify="left" if not col else "right")
    for name in ("overall", "cues", "distractors"):
        r = result[name]
        main.add_row(
            name,
            *(f"{r['span'][k]:.3f}" for k in ("precision", "recall", "f1")),
            f"{r['exact_segment']['f1']:.3f}",
            f"{r['kind_accuracy']:.3f}",
            str(r["counts"]["pred_spans"]),
            str(r["counts"]["gold_spans"]),
        )
    kinds = Table(title="per cue kind (gold spans)")
    for col in ("kind", "gold", "char recall", "exact", "overlapped", "right kind"):
        kinds.add_column(col, justify="left" if col == "kind" else "right")
    for kind, row in result["per_cue_kind"].items():
        kinds.add_row(
            kind,
            str(row["gold"]),
            f"{row['char_recall']:.3f}",
            str(row["exact"]),
            str(row["overlapped"]),
            str(row["right_kind"]),
        )
    return [main, kinds]
