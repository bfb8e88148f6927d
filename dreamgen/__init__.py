"""dreamgen: synthetic decision-point conversations with exact direction-cue labels.

Public API::

    import dreamgen
    records = dreamgen.generate(20)                       # sync, embedded engine by default
    async for r in dreamgen.stream(dreamgen.Config(...)):  # records as they become durable
        ...
    for r in dreamgen.read("output/demo", split="train"):  # stream a built dataset
        ...
    dreamgen.validate(raw_json, request)                   # -> Record, or raises Rejected
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreamgen.record import Record, Span
from dreamgen.validate import Rejected, validate
from dreamgen.version import __version__

if TYPE_CHECKING:
    from dreamgen.config import Config, ConfigError, load_config
    from dreamgen.engines import EngineError

# The serving side's names resolve on first use (PEP 562), so that ``import
# dreamgen.training`` does not load aiohttp, jinja2 or tenacity. (``validate`` is imported
# eagerly: it is light, and the function must shadow the submodule of the same name.)
_LAZY = {
    "Config": "dreamgen.config",
    "ConfigError": "dreamgen.config",
    "load_config": "dreamgen.config",
    "EngineError": "dreamgen.engines",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dreamgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Config",
    "ConfigError",
    "EngineError",
    "Record",
    "Rejected",
    "Span",
    "__version__",
    "generate",
    "load_config",
    "read",
    "stream",
    "validate",
]


def _config(config: Config | None, overrides: dict[str, Any]) -> Config:
    from dreamgen.config import Config

    base = (config or Config()).model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Config.model_validate(base)


def generate(n: int, config: Config | None = None, **overrides: Any) -> list[Record]:
    """Generate until the output folder holds ``n`` records; return those made by this call.

    Without ``out`` (in ``config`` or ``overrides``) records go to a fresh temporary
    folder. Works from plain scripts and from inside a running event loop (a notebook):
    there the run happens on a worker thread with its own loop.
    """
    if config is None and "out" not in overrides:
        overrides["out"] = Path(tempfile.mkdtemp(prefix="dreamgen-"))
    cfg = _config(config, {**overrides, "count": n})
    made: list[Record] = []

    async def go() -> None:
        from dreamgen.pipeline import Run

        await Run(cfg, on_record=made.append).run()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(go())
        return made
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, go()).result()
    return made


async def stream(
    config: Config | None = None, *, buffer: int = 64, **overrides: Any
) -> AsyncIterator[Record]:
    """Yield records as they become durable, until the target (``count``) is reached.

    Backpressure: when ``buffer`` records wait unconsumed, no new requests are issued.
    ``count=None`` streams until the consumer stops iterating.
    """
    from dreamgen.pipeline import Run

    cfg = _config(config, overrides)
    queue: asyncio.Queue[Record] = asyncio.Queue()
    run = Run(cfg, on_record=queue.put_nowait, hold=lambda: queue.qsize() >= buffer)
    task = asyncio.create_task(run.run())
    try:
        while True:
            get = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                yield get.result()
                continue
            get.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            task.result()  # re-raise a failed run
            return
    finally:
        if not task.done():
            run.stop("consumer")
            await asyncio.gather(task, return_exceptions=True)


def read(path: str | Path, split: str | None = None, **filters: Any) -> Any:
    """Stream validated records from a JSONL file or an output folder's closed shards.

    See ``dreamgen.reader.read`` for the filters (``min_difficulty``, ``kinds``, ``follow``).
    """
    from dreamgen import reader

    return reader.read(Path(path), split=split, **filters)
