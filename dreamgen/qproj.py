"""Trained query projections as a small safetensors file, loadable on top of a base model.

Only the ``*.q_proj.*`` tensors of the trained layers are stored (in the dtype they were
trained in), with metadata naming the format and the base model. ``apply_qproj`` copies
them into a loaded model after checking that every name exists and every shape matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

FORMAT = "dreamgen-qproj-1"


class QprojError(ValueError):
    """A q_proj file does not fit the model (missing names, other shapes, other format)."""


def qproj_names(model: Any, layers: Iterable[int] | None = None) -> list[str]:
    """Names of the ``*.q_proj.*`` parameters, of the given layer indices (all if None).

    A layer index is the number after ``.layers.`` in the name (HF decoder convention).
    """
    wanted = None if layers is None else set(layers)
    names = []
    for name, _ in model.named_parameters():
        if ".q_proj." not in name:
            continue
        if wanted is None or _layer_of(name) in wanted:
            names.append(name)
    return names


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def save_qproj(model: Any, path: str | Path, names: Iterable[str], base_model: str) -> Path:
    """Write the named parameters of ``model`` to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in names}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"format": FORMAT, "base_model": base_model})
    return target


def apply_qproj(model: Any, path: str | Path) -> list[str]:
    """Copy the tensors of a q_proj file into ``model`` in place; return their names."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise QprojError(f"{path}: cannot read q_proj file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise QprojError(f"{path}: not a dreamgen q_proj file (format {meta.get('format')!r})")
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise QprojError(f"{path}: {name} is not a parameter of this model")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise QprojError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                f"{tuple(params[name].shape)} (trained on {meta.get('base_model')!r}?)"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    return sorted(tensors)
