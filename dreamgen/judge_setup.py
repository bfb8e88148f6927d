"""Setting the judge up: on or off, which engine, calibrated enough to filter or not.

``resolve`` decides ``judge.enabled`` (and refuses a judge below ``judge.floor`` for
filtering, before anything is written); ``open_judge`` gives a run its ``Judge`` on the
generating engine or on the judge's own (``judge.server`` / ``judge.model``, opened with
``open_engine`` on a derived Config); ``Calibration`` is what ``dreamgen judge-eval
--save`` writes and ``judge.calibration`` reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from dreamgen.config import Config, ConfigError, ServingConfig
from dreamgen.engines.base import Engine, EngineError
from dreamgen.engines.factory import open_engine
from dreamgen.errors import first_error
from dreamgen.judge import Judge


class Calibration(BaseModel):
    """What ``dreamgen judge-eval --save`` writes: one judge's dev-set numbers."""

    model_config = ConfigDict(extra="forbid")

    model: str
    dataset: str
    dataset_sha256: str
    n: int
    pairwise_accuracy: float
    pairwise_ci: tuple[float, float]
    position_bias: float
    kind_agreement: float
    floor: float
    created_at: float


def load_calibration(path: Path) -> Calibration:
    """Read a calibration file; a missing or bad one is a one-line ConfigError."""
    try:
        return Calibration.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"judge.calibration {path}: cannot read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"judge.calibration {path}: {first_error(exc)}") from None


def judge_model_name(config: Config) -> str:
    """The judge's model name: ``judge.model``, else the generator's."""
    return config.judge.model or config.model_name


def _separate(config: Config) -> bool:
    j = config.judge
    return j.server is not None or (j.model is not None and j.model != config.model_name)


def _refusal(config: Config) -> str | None:
    """Why this judge may not filter (None: it may)."""
    j = config.judge
    if j.floor == 0:
        return None
    name = judge_model_name(config)
    if j.calibration is None:
        return (
            f"judge {name!r} is not calibrated: filtering needs judge.calibration "
            f"(dreamgen judge-eval tests/data/dev.jsonl --save FILE) or judge.floor = 0"
        )
    cal = load_calibration(j.calibration)
    if cal.model != name:
        return f"judge.calibration {j.calibration} is for model {cal.model!r}, not {name!r}"
    if cal.pairwise_accuracy < j.floor:
        return (
            f"judge {name!r} is refused for filtering: dev-set pairwise accuracy "
            f"{cal.pairwise_accuracy:.3f} is below judge.floor {j.floor:g} "
            '(judge.mode = "score" still scores)'
        )
    return None


def _check(config: Config) -> None:
    j = config.judge
    if j.server is not None and j.model is None:
        raise ConfigError("judge.server needs judge.model (the judge's served model name)")
    if config.engine == "embedded" and j.server is None and _separate(config):
        raise ConfigError(
            "the embedded engine serves only SmolLM2: set judge.server for judge.model"
        )


def resolve(config: Config) -> Config:
    """``config`` with ``judge.enabled`` decided; raises ConfigError if the judge is refused.

    Unset, the judge is off on the embedded engine and on for a server engine whose judge
    passed calibration. Set on with ``mode = "filter"``, a judge below the floor is refused.
    """
    _check(config)
    j = config.judge
    enabled = j.enabled
    if enabled is None:
        enabled = (
            config.engine != "embedded" and j.calibration is not None and _refusal(config) is None
        )
    elif enabled and j.mode == "filter":
        why = _refusal(config)
        if why is not None:
            raise ConfigError(why)
    return config.model_copy(update={"judge": j.model_copy(update={"enabled": enabled})})


def judge_config(config: Config) -> Config:
    """The Config that opens the judge's own engine (``judge.server`` / ``judge.model``)."""
    j = config.judge
    data = config.model_dump()
    data.update(
        engine="openai",
        servers=[j.server] if j.server else config.servers,
        model=judge_model_name(config),
        concurrency=j.concurrency,
        adaptive=False,
        serving=ServingConfig(guided_decoding=config.serving.guided_decoding).model_dump(),
    )
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"judge: {first_error(exc, 'judge')}") from None


@contextlib.asynccontextmanager
async def open_judge(
    config: Config, generator: Engine | None, *, wait: bool = False
) -> AsyncIterator[Judge | None]:
    """The judge a run uses (None when off): on ``generator`` or on its own engine.

    ``generator`` None (judge-eval) opens the configured engine for the judge itself.
    """
    if generator is not None and not config.judge.enabled:
        yield None
        return
    if generator is not None and not _separate(config):
        yield Judge(generator, config.judge, own_window=False)
        return
    _check(config)
    own = judge_config(config) if _separate(config) else config
    async with contextlib.AsyncExitStack() as stack:
        try:  # only a failure to open is the judge's; errors of the caller's body pass as is
            engine, _ = await stack.enter_async_context(open_engine(own, wait=wait))
        except EngineError as exc:
            raise type(exc)(f"judge: {exc}") from exc
        yield Judge(engine, config.judge, own_window=True)
