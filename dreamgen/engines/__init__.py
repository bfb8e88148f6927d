"""The serving side: engines that turn chat messages into completions.

- ``base``: the ``Engine`` contract (every capability declared, with defaults),
  ``Completion`` and the engine errors;
- ``client``: the async HTTP client for one OpenAI-compatible server;
- ``server``: ``ServerEngine``, replicas with health checks, outages and routing;
- ``limits``: a server's load from ``/metrics``, the adaptive limiter, the window;
- ``launcher``: a supervised ``vllm serve`` child;
- ``embedded``: llama.cpp's server in-process, with SmolLM2 (the default engine);
- ``offline``: ``vllm.LLM`` in-process (optional extra);
- ``factory``: ``open_engine``, from a Config to a started engine.
"""

from dreamgen.engines.aio import wait_event
from dreamgen.engines.base import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailable,
    TransientError,
)
from dreamgen.engines.client import OpenAIClient, RetryBudget, api_key_from_env
from dreamgen.engines.embedded import EMBEDDED_MODEL, SMOLLM2_FILE, EmbeddedServer, smollm2_path
from dreamgen.engines.factory import open_engine
from dreamgen.engines.launcher import Launcher, LaunchInfo, parse_launch
from dreamgen.engines.limits import AdaptiveLimiter, Gate, ServerLoad, parse_metrics
from dreamgen.engines.offline import OfflineEngine, import_vllm
from dreamgen.engines.server import Replica, ServerEngine

__all__ = [
    "EMBEDDED_MODEL",
    "SMOLLM2_FILE",
    "AdaptiveLimiter",
    "Completion",
    "EmbeddedServer",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "Gate",
    "LaunchInfo",
    "Launcher",
    "OfflineEngine",
    "OpenAIClient",
    "Replica",
    "RetryBudget",
    "ServerEngine",
    "ServerLoad",
    "TransientError",
    "api_key_from_env",
    "import_vllm",
    "open_engine",
    "parse_launch",
    "parse_metrics",
    "smollm2_path",
    "wait_event",
]
