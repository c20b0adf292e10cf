"""Test tiers: fast tests first; tests marked `vllm` last, once real servers are up.

The real vLLM servers start right after collection, in the background, so that loading them
overlaps with the fast tests instead of adding to them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.commands.tiny_models import build_all
from tests.otlp_receiver import OtlpReceiver
from tests.redis_server import RedisServer
from tests.servers import FakeBackend
from tests.vllm_rig import MODELS_DIR, VllmRig

_rig = VllmRig()


def pytest_collection_modifyitems(session: pytest.Session, items: list[pytest.Item]) -> None:
    """Fast tests, then the rig's tests, then modules with real servers of their own (marked
    `vllm_own`), which run once the rig has given its eight places back."""
    items.sort(key=_tier)


def _tier(item: pytest.Item) -> int:
    if item.get_closest_marker("vllm_own") is not None:
        return 2
    return 1 if item.get_closest_marker("vllm") is not None else 0


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once `-m`/`-k` have deselected what they will: `-m "not vllm"` starts no server."""
    if any(_tier(item) == 1 for item in session.items):
        _rig.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _rig.stop()


@pytest.fixture(scope="session")
def vllm() -> dict[str, str]:
    """Model name -> URL of a real vLLM CPU server."""
    return _rig.wait_ready()


@pytest.fixture(scope="session")
def rig(vllm: dict[str, str]) -> VllmRig:
    return _rig


@pytest.fixture(scope="session")
def rig_stopped() -> None:
    """For `vllm_own` modules: the rig's servers are gone, so a module may start up to eight
    of its own (the tiny models are built)."""
    _rig.stop()
    build_all(MODELS_DIR)


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    backend = FakeBackend("fake-chat", "--chunks", "8")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """One OTLP/HTTP trace receiver for the session: the gateways and vLLM servers under test
    export to it; tests tell their traces apart by trace id."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session, started when a test first asks for it; tests
    keep apart by key prefix. A test that stops Redis starts one of its own."""
    server = RedisServer()
    yield server
    server.stop()
