"""Per-key limits counted in a real Redis by two gateway processes (`vllm-gateway serve`, as
users run it) in front of the rig's real vLLM chat server: the key's minute and its requests in
flight are one for both gateways."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import bearer, wait_until
from tests.redis_server import RedisServer
from tests.servers import GatewayProcess

pytestmark = pytest.mark.vllm

KEYS = [
    {"name": "three-a-minute", "key": "sk-three", "requests_per_minute": 3},
    {"name": "one-at-once", "key": "sk-one", "max_concurrent": 1},
]


@pytest.fixture(scope="module")
def gateways(
    vllm: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[GatewayProcess]]:
    config = {
        "models": [{"name": "tiny-chat", "url": vllm["tiny-chat"]}],
        "api_keys": KEYS,
        "limits_store": {"url": redis_server.url, "prefix": f"rig-{uuid.uuid4().hex[:8]}"},
    }
    workdir: Path = tmp_path_factory.mktemp("limits")
    both = [GatewayProcess(config, workdir), GatewayProcess(config, workdir)]
    yield both
    for gateway in both:
        gateway.close()


def client(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


ASK = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_three_a_minute_through_two_gateways_is_three_in_all(
    gateways: list[GatewayProcess],
) -> None:
    first, second = gateways
    for gateway in (first, second, first):
        answer = client(gateway, "sk-three").chat.completions.create(**ASK)
        assert answer.choices[0].message.content is not None
    for gateway in gateways:
        with pytest.raises(openai.RateLimitError) as refused:
            client(gateway, "sk-three").chat.completions.create(**ASK)
        # The next token in at most 20 s (one every 20 s, less what came while these ran).
        assert 1 <= int(refused.value.response.headers["retry-after"]) <= 20


def test_one_request_in_flight_on_one_gateway_refuses_the_key_on_the_other(
    gateways: list[GatewayProcess],
) -> None:
    first, second = gateways
    # 16 choices of 900 tokens: seconds of generation (tests/integration/test_abort.py).
    long = {**ASK, "max_tokens": 900, "n": 16, "ignore_eos": True, "stream": True}
    url = f"{first.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=long, headers=bearer("sk-one"), timeout=60) as stream:
        events = stream.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(events).startswith("data: ")  # vLLM is generating
        with pytest.raises(openai.RateLimitError) as refused:
            client(second, "sk-one").chat.completions.create(**ASK)
        assert "1 requests in flight" in refused.value.message
    wait_until(
        lambda: (
            httpx.post(
                f"{second.url}/v1/chat/completions", json=ASK, headers=bearer("sk-one"), timeout=60
            ).status_code
            == 200
        ),
        30,
        "the slot to come back once the stream's client left",
    )
