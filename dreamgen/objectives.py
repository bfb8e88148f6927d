"""Training only the attention query projections (W_q), under one of three objectives.

- ``lm``: cross-entropy on the listening response (the Record's ``target``), context frozen;
- ``pref``: a DPO loss with the listening response as chosen and the reflex response
  (``contrast``) as rejected; the reference is the model before training (its log-probs
  are computed once, up front, since only q_proj moves);
- ``attn``: ``lm`` plus ``attn_lambda`` times an auxiliary attention loss at the decision
  position: -ln(direction share), the share being cue / (cue + distractor) attention per
  token (head means) in ``attn_layers``, over the records that have distractor tokens.

Every parameter but the chosen layers' ``*.q_proj.*`` is frozen. ``train_qproj`` runs the
loop and reports the loss per step through ``on_step`` (the CLI's progress line).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from dreamgen.decision import DEFAULT_SINK_TOKENS
from dreamgen.qproj import qproj_names
from dreamgen.record import Record
from dreamgen.training import IGNORE_INDEX

Objective = Literal["lm", "pref", "attn"]
OBJECTIVES: tuple[Objective, ...] = ("lm", "pref", "attn")


class TrainSettings(BaseModel):
    """How to train q_proj (the defaults were chosen before any held-out measurement)."""

    steps: int = Field(default=40, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "apollo"] = "adamw"
    apollo_rank: int = Field(default=128, ge=1)
    max_length: int = Field(default=384, ge=8)
    layers: list[int] | None = None  # q_proj of these layers train; None: all
    pref_beta: float = Field(default=0.1, gt=0)
    attn_lambda: float = Field(default=1.0, ge=0)
    attn_layers: list[int] | None = None  # None: the trained layers in the first 2/3 of depth
    sink_tokens: int = Field(default=DEFAULT_SINK_TOKENS, ge=0)
    seed: int = 0


class TrainResult(BaseModel):
    """What a training run did."""

    objective: Objective
    loss: list[float]
    steps: int
    n_train: int
    skipped_too_long: int
    trained: list[str]
    attn_layers: list[int]
    seconds: float


class TrainError(ValueError):
    """Training cannot start (no parameter to train, no record that fits)."""


StepCallback = Callable[[int, int, float], None]


def make_optimizer(params: list[Any], settings: TrainSettings) -> Any:
    """AdamW, or APOLLO (``apollo-torch``) with a low-rank projection on the 2-D weights."""
    import torch

    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    try:
        from apollo_torch import APOLLOAdamW
    except ImportError:
        raise TrainError(
            "--optimizer apollo needs apollo-torch: pip install apollo-torch"
        ) from None
    matrices = [p for p in params if p.dim() == 2]
    others = [p for p in params if p.dim() != 2]
    lowrank = {
        "params": matrices,
        "rank": settings.apollo_rank,
        "proj": "random",
        "scale_type": "channel",
        "scale": 1.0,
        "update_proj_gap": 200,
        "proj_type": "std",
    }
    groups = [g for g in ({"params": others}, lowrank) if g["params"]]
    return APOLLOAdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def freeze_all_but_qproj(model: Any, layers: Sequence[int] | None) -> list[str]:
    """Freeze every parameter except the chosen layers' q_proj; return the trainable names."""
    names = set(qproj_names(model, layers))
    for name, param in model.named_parameters():
        param.requires_grad = name in names
    if not names:
        raise TrainError(f"{type(model).__name__} has no q_proj parameters in layers {layers}")
    return sorted(names)


def sequence_logprobs(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
    """Sum of the log-probabilities of the labelled tokens, per row: ``[batch]``."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -(nll * (targets != IGNORE_INDEX)).sum(-1)


def pref_loss(model: Any, batch: dict[str, Any], ref: Any, beta: float) -> Any:
    """DPO: -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))."""
    import torch
    import torch.nn.functional as F

    ids = torch.cat([batch["input_ids"], batch["contrast_input_ids"]])
    mask = torch.cat([batch["attention_mask"], batch["contrast_attention_mask"]])
    labels = torch.cat([batch["labels"], batch["contrast_labels"]])
    logp = sequence_logprobs(model, ids, mask, labels)
    n = batch["input_ids"].shape[0]
    margin = (logp[:n] - ref[:, 0]) - (logp[n:] - ref[:, 1])
    return -F.logsigmoid(beta * margin).mean()


class AttentionCapture:
    """Forward hooks that keep the attention weights of the chosen layers (with grad)."""

    def __init__(self, model: Any, layers: Sequence[int]) -> None:
        self.weights: dict[int, Any] = {}
        self._handles = []
        modules = {n: m for n, m in model.named_modules() if n.endswith("self_attn")}
        for layer in layers:
            module = next((m for n, m in modules.items() if f".layers.{layer}." in f"{n}."), None)
            if module is None:
                raise TrainError(f"no attention module for layer {layer}")
            self._handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) > 1 and output[1] is not None):
                raise RuntimeError("attention weights unavailable: the model is not running eager")
            self.weights[layer] = output[1]

        return hook

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def direction_share_loss(weights: Sequence[Any], batch: dict[str, Any], sink_tokens: int) -> Any:
    """Mean over layers and usable rows of -ln(cue / (cue + distractor)), per token, at the
    decision query; rows without cue or distractor tokens are left out (0 if none is left)."""
    import torch

    rows = torch.arange(batch["input_ids"].shape[0])
    cue = batch["cue_mask"].clone()
    dis = batch["distractor_mask"].clone() & ~cue
    cue[:, :sink_tokens] = False  # attention sinks are no one's direction
    dis[:, :sink_tokens] = False
    n_cue, n_dis = cue.sum(-1), dis.sum(-1)
    usable = (n_cue > 0) & (n_dis > 0)
    if not bool(usable.any()):
        return weights[0].sum() * 0.0
    losses = []
    for w in weights:
        row = w[rows, :, batch["decision_index"], :].float().mean(1)  # [batch, keys]
        cue_pt = (row * cue).sum(-1) / n_cue.clamp(min=1)
        dis_pt = (row * dis).sum(-1) / n_dis.clamp(min=1)
        share = cue_pt / (cue_pt + dis_pt).clamp(min=1e-12)
        losses.append(-torch.log(share.clamp(min=1e-12))[usable])
    return torch.cat(losses).mean()


def default_attn_layers(num_layers: int, trained: Sequence[int] | None) -> list[int]:
    """Early-to-mid layers (the first two thirds) that are also trained."""
    early = range(max(1, (2 * num_layers) // 3))
    return [x for x in early if trained is None or x in trained]


def train_qproj(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    objective: Objective,
    settings: TrainSettings,
    *,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train the chosen layers' q_proj of ``model`` in place under ``objective``."""
    import torch
    from torch.utils.data import DataLoader

    from dreamgen.training import WqDataset, collate_fn

    started = time.monotonic()
    torch.manual_seed(settings.seed)
    device = next(model.parameters()).device
    trained = freeze_all_but_qproj(model, settings.layers)
    num_layers = int(model.config.num_hidden_layers)
    attn_layers = settings.attn_layers or default_attn_layers(num_layers, settings.layers)
    dataset = WqDataset(
        records, tokenizer, max_length=settings.max_length, include_contrast=objective == "pref"
    )
    if len(dataset) == 0:
        raise TrainError(f"no training record fits max_length {settings.max_length}")
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        collate_fn=collate_fn(tokenizer),
        generator=torch.Generator().manual_seed(settings.seed),
    )
    # eager is the only implementation that returns weights; sdpa is faster otherwise
    model.set_attn_implementation("eager" if objective == "attn" else "sdpa")
    ref = _reference_logprobs(model, loader) if objective == "pref" else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, settings)
    capture = AttentionCapture(model, attn_layers) if objective == "attn" else None
    losses: list[float] = []
    model.train()
    try:
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        for step, cpu_batch in zip(range(settings.steps), batches, strict=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
            if objective == "pref":
                pair = torch.tensor([ref[i] for i in batch["id"]], device=device)
                loss = pref_loss(model, batch, pair, settings.pref_beta)
            else:
                loss = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                    use_cache=False,
                ).loss
                if capture is not None:
                    weights = [capture.weights[x] for x in attn_layers]
                    aux = direction_share_loss(weights, batch, settings.sink_tokens)
                    loss = loss + settings.attn_lambda * aux
                    capture.weights.clear()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, settings.steps, losses[-1])
    finally:
        if capture is not None:
            capture.close()
        model.eval()
        for param in model.parameters():
            param.requires_grad = False
    return TrainResult(
        objective=objective,
        loss=losses,
        steps=len(losses),
        n_train=len(dataset),
        skipped_too_long=dataset.skipped,
        trained=trained,
        attn_layers=list(attn_layers) if objective == "attn" else [],
        seconds=round(time.monotonic() - started, 2),
    )


def _reference_logprobs(model: Any, loader: Any) -> dict[str, tuple[float, float]]:
    """Chosen and rejected log-probs of every pair under the model as it is now."""
    import torch

    device = next(model.parameters()).device
    out: dict[str, tuple[float, float]] = {}
    model.eval()
    with torch.inference_mode():
        for cpu_batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
            chosen = sequence_logprobs(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            rejected = sequence_logprobs(
                model,
                batch["contrast_input_ids"],
                batch["contrast_attention_mask"],
                batch["contrast_labels"],
            )
            for rid, c, r in zip(batch["id"], chosen.tolist(), rejected.tolist(), strict=True):
                out[rid] = (c, r)
    return out
