"""A reload changes a model's `balance: prefix` in place: the index it learnt is kept, and its
replicas' KV-cache events feed it as the new config says (models added, URLs changed,
balancing turned on or off, pods discovered as they join and leave). In-process: the
subscribers connect to endpoints where nothing publishes, which ZMQ allows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.pool import Replica
from gateway.app import build_runtime
from gateway.config_file import load_settings
from gateway.reload import Reloader
from gateway.runtime import Runtime
from tests.helpers import until

U1, U2, U3 = (f"http://127.0.0.1:{port}" for port in (19701, 19702, 19703))
E1, E2, E3 = (f"tcp://127.0.0.1:{port}" for port in (19711, 19712, 19713))


def prefixed(name: str, urls: list[str], kv_events: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "urls": urls,
        "balance": "prefix",
        "prefix": {"kv_events": kv_events, **extra},
    }


class Gateway:
    """A runtime built from a config file, and its reloader."""

    def __init__(self, tmp_path: Path, models: list[dict[str, Any]]) -> None:
        self.path = tmp_path / "config.yaml"
        self.log_dir = str(tmp_path / "logs")
        self.answer: dict[str, Sequence[str]] = {}  # DNS name -> addresses
        self.write(models)
        self.runtime: Runtime = build_runtime(load_settings(self.path), None, self.resolve)
        self.reloader = Reloader(self.runtime, self.path, gpu_count=0)

    async def resolve(self, host: str, port: int) -> Sequence[str]:
        return self.answer.get(host, ())

    def write(self, models: list[dict[str, Any]]) -> None:
        self.path.write_text(yaml.safe_dump({"models": models, "log_dir": self.log_dir}))

    async def reload(self, models: list[dict[str, Any]]) -> None:
        self.write(models)
        await self.reloader.reload("test")

    def fed(self, name: str) -> dict[str, str]:
        """URL -> the endpoint its replica's events are read from."""
        return {r.url: e for r, e in self.runtime.kv_events.endpoints(name).items()}

    def replica(self, name: str, url: str) -> Replica:
        return next(r for r in self.runtime.pool(name).replicas if r.url == url)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(tmp_path, [{"name": "plain", "urls": [U1]}])
    await gw.runtime.start()
    yield gw
    await gw.runtime.stop()


async def test_a_model_a_reload_adds_is_fed_by_its_replicas(gateway: Gateway) -> None:
    await gateway.reload([{"name": "plain", "urls": [U1]}, prefixed("p", [U1, U2], [E1, E2])])
    assert gateway.fed("p") == {U1: E1, U2: E2}
    await gateway.reload([{"name": "plain", "urls": [U1]}])
    assert gateway.fed("p") == {}  # removed: its subscribers are gone


async def test_a_model_turned_to_prefix_gets_an_index_and_its_feed_and_back(
    gateway: Gateway,
) -> None:
    assert gateway.runtime.pool("plain").prefix is None
    await gateway.reload([prefixed("plain", [U1], [E1])])
    assert gateway.runtime.pool("plain").prefix is not None
    assert gateway.fed("plain") == {U1: E1}
    await gateway.reload([{"name": "plain", "urls": [U1]}])
    assert gateway.runtime.pool("plain").prefix is None and gateway.fed("plain") == {}


async def test_what_the_index_learnt_survives_a_reload_unless_its_blocks_change_size(
    gateway: Gateway,
) -> None:
    await gateway.reload([prefixed("plain", [U1], [E1])])
    index = gateway.runtime.pool("plain").prefix
    await gateway.reload([prefixed("plain", [U1], [E1], load_slack=5)])
    assert gateway.runtime.pool("plain").prefix is index
    assert index is not None and index.policy.slack == 5  # the new knob, in place
    await gateway.reload([prefixed("plain", [U1], [E1], block_bytes=512)])
    assert gateway.runtime.pool("plain").prefix is not index


async def test_the_feed_follows_a_models_urls_and_endpoints(gateway: Gateway) -> None:
    await gateway.reload([prefixed("plain", [U1, U2], [E1, E2])])
    kept = gateway.replica("plain", U1)
    await gateway.reload([prefixed("plain", [U1, U3], [E3, E2])])
    await until(lambda: gateway.fed("plain") == {U1: E3, U3: E2}, what="the new endpoints")
    assert gateway.replica("plain", U1) is kept  # the same replica, read elsewhere


async def test_discovered_pods_are_fed_as_they_join_and_leave(tmp_path: Path) -> None:
    model = {
        "name": "pods",
        "discover": {"dns": "pods.local:8000", "interval": 3600},
        "balance": "prefix",
        "prefix": {"kv_events_port": 5557},
    }
    gw = Gateway(tmp_path, [model])
    gw.answer["pods.local"] = ["10.0.0.1", "10.0.0.2"]
    await gw.runtime.start()
    try:
        assert gw.fed("pods") == {
            "http://10.0.0.1:8000": "tcp://10.0.0.1:5557",
            "http://10.0.0.2:8000": "tcp://10.0.0.2:5557",
        }
        gw.answer["pods.local"] = ["10.0.0.2", "10.0.0.3"]
        await gw.runtime.discoveries["pods"].refresh()  # what its timer does
        await until(
            lambda: (
                gw.fed("pods")
                == {
                    "http://10.0.0.2:8000": "tcp://10.0.0.2:5557",
                    "http://10.0.0.3:8000": ("tcp://10.0.0.3:5557"),
                }
            ),
            what="the new pod fed, the one that left not",
        )
    finally:
        await gw.runtime.stop()
