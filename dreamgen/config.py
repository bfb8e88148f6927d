"""One configuration object for the CLI, the daemon and library callers (TOML on disk)."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dreamgen.breaker import BreakerConfig
from dreamgen.cards import PROMPTS_DIR
from dreamgen.errors import first_error
from dreamgen.pairs import PairKind
from dreamgen.serving import EMBEDDED_MODEL, parse_launch


class ConfigError(Exception):
    """The configuration is invalid; the message says which field and why."""


# Every number in a config is finite (no nan/inf: `_Section` refuses them) and bounded well
# below what breaks a timer, arithmetic or a 64-bit JSON integer in the manifest.
WEEK_S = 7 * 86_400.0
BIG = 1_000_000  # concurrency, tokens, counts of things per batch
SEED = Annotated[int, Field(ge=0, le=2**62)]
SECONDS = Annotated[float, Field(gt=0, le=WEEK_S)]
GRACE = Annotated[float, Field(ge=0, le=WEEK_S)]
POSITIVE = Annotated[int, Field(ge=1, le=BIG)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingConfig(_Section):
    """Sampling parameters sent with every request."""

    temperature: Annotated[float, Field(ge=0, le=10)] = Field(
        0.3, description="low by default: the small model rambles hot"
    )
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_tokens: Annotated[int, Field(ge=1, le=BIG)] = Field(
        1200, description="answers that hit this are rejected as truncated"
    )
    seed: SEED | None = Field(None, description="per-request seed base (vLLM honours it)")
    top_k: Annotated[int, Field(ge=-1, le=BIG)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = Field(
        1.1, description="vLLM's name; sent as repeat_penalty too for llama.cpp"
    )

    def body(self, request_index: int) -> dict[str, Any]:
        """The sampling fields of one request's body (vLLM extensions included when set)."""
        out: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        if self.seed is not None:
            out["seed"] = self.seed + request_index
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.min_p is not None:
            out["min_p"] = self.min_p
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = self.repetition_penalty
            out["repeat_penalty"] = self.repetition_penalty
        return out


class PlanConfig(_Section):
    """What the planner aims for."""

    seed: SEED = 0
    difficulty_min: Annotated[int, Field(ge=1, le=5)] = 1
    difficulty_max: Annotated[int, Field(ge=1, le=5)] = 5
    schedule: Literal["uniform", "broad_to_subtle"] = "uniform"
    evolve_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    undirected_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    # Direction vs correctness: share of directed scenarios whose direction is mistaken or
    # risky (split evenly over those stakes values; only cards that allow them serve them).
    stakes_share: Annotated[float, Field(ge=0, le=1)] = 0.1
    max_generation: Annotated[int, Field(ge=1, le=10)] = 3
    # Relative cell weights: keys "cue_kind/distractor_kind/difficulty", "*" matches any.
    quotas: dict[str, Annotated[float, Field(ge=0, le=1e9)]] = {}
    # Share of accepted scenarios that also get minimal-pair variants (chosen by record id,
    # so the choice is stable across runs); which variants to derive.
    minimal_pairs: Annotated[float, Field(ge=0, le=1)] = 0.0
    minimal_pair_kinds: list[PairKind] = ["cue_removed", "cue_contradicted"]

    @model_validator(mode="after")
    def _range(self) -> PlanConfig:
        if self.difficulty_min > self.difficulty_max:
            raise ValueError(
                f"difficulty_min {self.difficulty_min} is above difficulty_max "
                f"{self.difficulty_max}"
            )
        return self


class StoreConfig(_Section):
    """How the output is sharded and flushed."""

    shard_records: Annotated[int, Field(ge=1, le=10**9)] = 1000
    shard_age_s: SECONDS = 600.0
    flush_records: Annotated[int, Field(ge=1, le=BIG)] = 32
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.2


class DedupConfig(_Section):
    """Exact and near-duplicate removal."""

    threshold: Annotated[float, Field(gt=0, le=1)] = 0.8
    num_perm: Annotated[int, Field(ge=16, le=512)] = 128
    index: Path | None = Field(None, description="shared dedup folder; default OUT/dedup")
    decontaminate: Path | None = Field(None, description="held-out JSONL: drop records near it")


class CopyConfig(_Section):
    """The copy filter (``dreamgen.copies``): reject answers that copy what the prompt showed."""

    max_share: Annotated[float, Field(gt=0, le=1)] = Field(
        0.3, description="reject above this share of word n-grams copied from the prompt"
    )
    ngram: Annotated[int, Field(ge=3, le=12)] = Field(6, description="words per n-gram")
    situation_allowance: Annotated[float, Field(ge=0, le=1)] = Field(
        0.2, description="share of n-grams a record may take from its own card's situation"
    )


class AdaptConfig(_Section):
    """Tuning for ``adaptive = true`` (limits are per server); see ``AdaptiveLimiter``."""

    min_concurrency: Annotated[int, Field(ge=1, le=BIG)] = Field(8, description="limit floor")
    start: POSITIVE | None = Field(None, description="default: concurrency, at most 256")
    min_waiting: Annotated[int, Field(ge=1, le=BIG)] = Field(
        4, description="requests kept queued at a saturated server, at least"
    )
    headroom: Annotated[float, Field(ge=0, le=1)] = Field(
        0.02, description="...or this share of its running count, if more"
    )
    growth: Annotated[float, Field(gt=0, le=4)] = Field(
        0.25, description="share of the limit added per scrape while nothing waits"
    )
    increase: Annotated[int, Field(ge=1, le=BIG)] = Field(8, description="...at least this")
    decrease: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.8, description="factor on preemptions and 429/503"
    )
    max_kv_usage: Annotated[float, Field(gt=0, le=1)] = Field(
        0.97, description="KV 'full' mark: no growth above it"
    )
    cooldown_s: GRACE = Field(5.0, description="between cuts on 429/503 and preemptions")


class ServingConfig(_Section):
    """Talking to servers: health checks, outages, a launched server, guided decoding."""

    launch: str | None = Field(None, description="command that starts the server (vllm serve …)")
    launch_log: Path | None = Field(None, description="its log file; default OUT/server.log")
    launch_timeout_s: SECONDS = Field(1800.0, description="first /health")
    stop_grace_s: GRACE = Field(30.0, description="SIGTERM → SIGKILL")
    restart_backoff_s: SECONDS = 2.0
    restart_backoff_max_s: SECONDS = 120.0
    health_interval_s: SECONDS = Field(2.0, description="probe period")
    outage_backoff_max_s: SECONDS = Field(30.0, description="probe backoff")
    guided_decoding: Literal["response_format", "structured_outputs"] = "response_format"
    schema_dialect: Literal["bounded", "unbounded"] = Field(
        "unbounded",
        description="unbounded: schemas without string lengths (xgrammar decodes them "
        "~2x faster; pydantic enforces the bounds after); bounded: for small models that "
        "ramble without a hard stop (the embedded engine always uses it)",
    )
    max_response_bytes: Annotated[int, Field(ge=65536, le=1 << 34)] | None = Field(
        None, description="cap on one response body; default 4 MiB + 64 bytes per max_tokens"
    )


class DaemonConfig(_Section):
    """The long-running ``dreamgen daemon``."""

    host: str = Field("127.0.0.1", description="health and metrics address")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(9450, description="0: ephemeral")
    grace_s: Annotated[float, Field(ge=0, le=WEEK_S)] = Field(30.0, description="drain on SIGTERM")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: Path | None = Field(None, description="default: stderr")


class ExecutorConfig(_Section):
    """Where generation runs: in this process (``local``) or in Ray worker actors (``ray``)."""

    kind: Literal["local", "ray"] = Field("local", description="local | ray")
    ray_address: str | None = Field(
        None, description="'auto', HOST:PORT of a running cluster, or unset: start one here"
    )
    workers: Annotated[int, Field(ge=1, le=4096)] = Field(2, description="worker actors")
    worker_cpus: Annotated[float, Field(ge=0, le=1024)] = 1.0
    worker_gpus: Annotated[float, Field(ge=0, le=64)] = Field(
        0.0, description="per worker: 1 for engine = 'vllm-offline' on a GPU node"
    )
    poison_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        3, description="worker deaths one request may cause before it is rejected"
    )


class OfflineConfig(_Section):
    """``engine = "vllm-offline"``: keyword arguments of ``vllm.LLM``."""

    tensor_parallel_size: Annotated[int, Field(ge=1, le=1024)] = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_model_len: Annotated[int, Field(ge=1, le=10**8)] | None = None
    dtype: str = "auto"
    llm_args: dict[str, Any] = Field({}, description="any other vllm.LLM keyword argument")


class JudgeConfig(_Section):
    """The LLM judge stage (``dreamgen.judge``): rubric thresholds, its engine, calibration."""

    enabled: bool | None = Field(
        None, description="None: on for server engines once calibrated, off on embedded"
    )
    mode: Literal["filter", "score"] = Field(
        "filter", description="filter: reject on failed checks; score: only record scores"
    )
    server: str | None = Field(None, description="the judge's own server; default: the generator")
    model: str | None = Field(None, description="judge model name; default: the generator's")
    concurrency: Annotated[int, Field(ge=1, le=BIG)] = Field(64, description="judge window")
    calibration: Path | None = Field(None, description="`dreamgen judge-eval --save` output")
    floor: Annotated[float, Field(ge=0, le=1)] = Field(
        0.7, description="dev-set pairwise accuracy needed to filter (0: no calibration needed)"
    )
    require_agreement: bool = Field(True, description="both A/B orders must pick the same reply")
    min_cue_direction: Annotated[float, Field(ge=0, le=1)] = 1.0
    min_kind_agreement: Annotated[float, Field(ge=0, le=1)] = 0.5
    min_distractor_own: Annotated[float, Field(ge=0, le=1)] = 1.0
    min_coherence: Annotated[float, Field(ge=1, le=5)] = 3.0
    max_difficulty_gap: Annotated[float, Field(ge=0, le=4)] = 2.0
    require_problem_named: bool = Field(True, description="stakes != none: listening names it")
    temperature: Annotated[float, Field(ge=0, le=10)] = 0.0
    max_tokens: Annotated[int, Field(ge=16, le=BIG)] = 400


class Config(_Section):
    """Everything a build, a daemon or a library call needs."""

    out: Path = Path("output/run")
    count: Annotated[int, Field(ge=1, le=10**12)] | None = Field(50, description="target for OUT")
    engine: Literal["embedded", "openai", "vllm-offline"] = "embedded"
    servers: list[str] = Field([], description="OpenAI-compatible base URLs (replicas)")
    model: str | None = Field(None, description="served model name; embedded: SmolLM2")
    api_key_env: str = Field("DREAMGEN_API_KEY", description="env var holding the API key")
    concurrency: Annotated[int, Field(ge=1, le=BIG)] = Field(
        1024, description="requests in flight per server: the ceiling with adaptive"
    )
    adaptive: bool = Field(True, description="adapt concurrency to vLLM's /metrics")
    embedded_parallel: Annotated[int, Field(ge=1, le=1024)] = 4
    embedded_threads: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None, description="llama.cpp threads (unset: every core; a Ray worker: its worker_cpus)"
    )
    request_timeout_s: SECONDS = 600.0
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 6
    prompts: Path = Field(
        PROMPTS_DIR,
        description="seed cards folder; default: the library shipped in dreamgen/prompts/",
        # The real default is absolute (found from any cwd); keep the published schema portable.
        json_schema_extra={"default": "dreamgen/prompts"},
    )
    extra_cards: list[Path] = Field(
        [],
        description="more seed-card folders, added to the cards of `prompts` "
        "(templates always come from `prompts`)",
    )
    sampling: SamplingConfig = SamplingConfig()
    plan: PlanConfig = PlanConfig()
    store: StoreConfig = StoreConfig()
    dedup: DedupConfig = DedupConfig()
    copies: CopyConfig = CopyConfig()
    adapt: AdaptConfig = AdaptConfig()
    serving: ServingConfig = ServingConfig()
    daemon: DaemonConfig = DaemonConfig()
    offline: OfflineConfig = OfflineConfig()
    executor: ExecutorConfig = ExecutorConfig()
    judge: JudgeConfig = JudgeConfig()
    breaker: BreakerConfig = BreakerConfig()
    splits: dict[Literal["train", "eval", "probe"], Annotated[float, Field(ge=0, le=1)]] = {
        "train": 0.9,
        "eval": 0.05,
        "probe": 0.05,
    }

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.serving.launch is not None:
            info = parse_launch(self.serving.launch)
            if "engine" not in self.model_fields_set:
                self.engine = "openai"
            if self.engine != "openai":
                raise ValueError("serving.launch needs engine 'openai'")
            if not self.servers:
                self.servers = [info.url]
            if not self.model:
                self.model = info.model
        if self.engine == "vllm-offline" and not self.model:
            raise ValueError("engine 'vllm-offline' needs the model (a Hugging Face id or path)")
        if self.engine == "openai" and not self.servers:
            raise ValueError("engine 'openai' needs at least one server URL (--server)")
        if self.engine == "openai" and not self.model:
            raise ValueError("engine 'openai' needs the served model name (--model)")
        if abs(sum(self.splits.values()) - 1.0) > 1e-6:
            raise ValueError("split ratios must sum to 1")
        return self

    @property
    def model_name(self) -> str:
        return self.model or EMBEDDED_MODEL

    def data_config(self) -> dict[str, Any]:
        """The fields that shape the data: a different value here means a different dataset."""
        keep = self.model_dump(
            mode="json",
            include={"engine", "model", "sampling", "plan", "splits", "copies"},
        )
        keep["dedup"] = {"threshold": self.dedup.threshold, "num_perm": self.dedup.num_perm}
        keep["model"] = self.model_name
        if self.judge.enabled:  # judged data is another dataset; unjudged folders keep theirs
            keep["judge"] = self.judge.model_dump(
                mode="json", exclude={"enabled", "server", "concurrency", "calibration"}
            )
        return keep

    def fingerprint(self, cards_fingerprint: str) -> str:
        payload = orjson.dumps(
            {**self.data_config(), "cards": cards_fingerprint}, option=orjson.OPT_SORT_KEYS
        )
        return hashlib.sha256(payload).hexdigest()[:16]


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Read a TOML config (or defaults), apply non-None ``overrides``, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"{path}: is a directory, not a TOML config file") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{first_error(exc, 'config')}") from exc
