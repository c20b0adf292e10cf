"""One gateway in connect mode in front of the rig's four real vLLM servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import GatewayServer, gateway_settings

KEY = "sk-integration"


@pytest.fixture(scope="session")
def gateway(vllm: dict[str, str]) -> Iterator[GatewayServer]:
    models = [
        {"name": "tiny-chat", "aliases": ["chat"], "url": vllm["tiny-chat"]},
        {"name": "tiny-reasoner", "url": vllm["tiny-reasoner"]},
        {"name": "tiny-embed", "url": vllm["tiny-embed"]},
        {"name": "tiny-rerank", "url": vllm["tiny-rerank"]},
        {"name": "nobody-home", "url": "http://127.0.0.1:9"},  # nothing listens on port 9
    ]
    server = GatewayServer(gateway_settings(models, api_keys=[KEY]))
    yield server
    server.close()
