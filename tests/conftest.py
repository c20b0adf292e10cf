"""Test tiers: fast tests first; tests marked `vllm` last, once real servers are up.

The real vLLM servers start right after collection, in the background, so that loading them
overlaps with the fast tests instead of adding to them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import FakeBackend
from tests.vllm_rig import VllmRig

_rig = VllmRig()


def pytest_collection_modifyitems(session: pytest.Session, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once `-m`/`-k` have deselected what they will: `-m "not vllm"` starts no server."""
    if any(item.get_closest_marker("vllm") for item in session.items):
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


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    backend = FakeBackend("fake-chat", "--chunks", "8")
    yield backend
    backend.close()
