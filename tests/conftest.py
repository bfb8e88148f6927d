from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dreamgen.cards import CardSet
from dreamgen.engines import EmbeddedServer
from dreamgen.scenario import Scenario

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so tests can import bench.vllm_sim


@pytest.fixture(scope="session")
def cards() -> CardSet:
    return CardSet.load()


@pytest.fixture
def scenario(cards: CardSet) -> Scenario:
    """A hand-written worked example from the shipped cards."""
    return cards.examples[0].model_copy(deep=True)


@pytest.fixture(scope="session")
def embedded_url() -> Iterator[str]:
    """The real embedded llama.cpp server with SmolLM2, shared by the session's tests."""
    with EmbeddedServer(parallel=2) as server:
        yield server.url
