"""Which optional extra provides a module, so a missing one ends in one actionable line.

The core install (``pip install dreamgen``) builds, validates, views and exports JSONL.
Training, probing, plots, ``--format hf`` and ``--push-to-hub`` need the ``train`` extra;
``engine = "vllm-offline"`` needs ``vllm``; ``--executor ray`` needs ``ray``; APOLLO
needs ``apollo``. The CLI maps a ``ModuleNotFoundError`` for any of these modules,
wherever it is raised, to ``error: ... pip install 'dreamgen[EXTRA]'`` instead of a
traceback.
"""

from __future__ import annotations

# Top-level module name → the extra of pyproject.toml that installs it.
EXTRA_OF: dict[str, str] = {
    "torch": "train",
    "transformers": "train",
    "accelerate": "train",
    "gguf": "train",
    "matplotlib": "train",
    "datasets": "train",
    "huggingface_hub": "train",
    "trl": "train",
    "safetensors": "train",
    "peft": "train",
    "vllm": "vllm",
    "ray": "ray",
    "apollo_torch": "apollo",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra that provides the missing module, or None if none does."""
    module = (exc.name or "").split(".", 1)[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return f"this needs {module}, from the '{extra}' extra: pip install 'dreamgen[{extra}]'"
