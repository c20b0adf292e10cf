"""Fallbacks between models and per-model timeouts, the whole gateway in-process: the app from a
config, its backends served in-process (``gateway.inprocess``), so every backend's answer is
the test's to choose. A model held for a start or a wake: test_fallback_cold.py; how a failure
is read as a reason: test_fallback_reasons.py; against real vLLM: tests/integration/
test_fallbacks.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.config_file import ConfigError, settings_from_dict
from gateway.h1 import ConnectFailed
from gateway.inprocess import Handler, InProcessUpstreams, Reply, Sent, refused
from tests.helpers import Output, bearer, until

BIG, MID, SMALL = "http://big.test", "http://mid.test", "http://small.test"
KEYS = [
    {"name": "team", "key": "sk-team"},
    {"name": "big-only", "key": "sk-big", "models": ["big"]},
    {"name": "ops", "key": "sk-ops", "monitor": True},
]
TOO_LONG = (
    "This model's maximum context length is 2048 tokens. However, your prompt contains 3000 "
    "input tokens, which exceeds this limit even without any output tokens. Please reduce the "
    "length of the input prompt. (parameter=input_tokens, value=3000)"
)


def vllm_error(status: int, message: str) -> Reply:
    """An error as vLLM writes it."""
    error = {"message": message, "type": "BadRequestError", "param": None, "code": status}
    return Reply.json({"error": error}, status)


def answering(name: str, max_model_len: int = 4096) -> Handler:
    """A backend serving ``name``: its /v1/models, and a completion for every POST."""

    async def handle(sent: Sent) -> Reply:
        if sent.method == "GET":
            return Reply.json({"data": [{"id": name, "max_model_len": max_model_len}]})
        return Reply.json({"model": orjson.loads(sent.body)["model"], "choices": []})

    return handle


def always(reply: Callable[[], Reply]) -> Handler:
    async def handle(sent: Sent) -> Reply:
        return reply()

    return handle


def silent() -> Handler:
    """A backend that takes the request and never answers."""

    async def handle(sent: Sent) -> Reply:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return handle


class Gateway:
    def __init__(
        self,
        backends: dict[str, Handler],
        models: list[dict[str, Any]],
        config_path: Path | None = None,
        **extra: Any,
    ) -> None:
        """``config_path``: the file a reload reads (which holds this config)."""
        self.upstreams = InProcessUpstreams(backends)
        settings = settings_from_dict({"models": models, "api_keys": KEYS, **extra}, env={})
        app = create_app(settings, upstreams=self.upstreams, config_path=config_path)
        transport = httpx.ASGITransport(app=app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://gw")

    async def chat(self, model: str, key: str = "sk-team", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post("/v1/chat/completions", json=body, headers=bearer(key))

    def sent_to(self) -> list[str]:
        """The backends asked, in order (the gateway's own GETs left out)."""
        return [s.url for s in self.upstreams.sent if s.method == "POST"]

    def sent_model(self, url: str) -> str:
        body = next(s.body for s in reversed(self.upstreams.sent) if s.url == url)
        model: str = orjson.loads(body)["model"]
        return model

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.client.get("/metrics", headers=bearer("sk-ops"))).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0


@pytest.fixture
async def closing() -> AsyncIterator[list[Gateway]]:
    made: list[Gateway] = []
    yield made
    for gateway in made:
        await gateway.client.aclose()


def two(**big: Any) -> list[dict[str, Any]]:
    """`big` falls back to `small` (named by its alias)."""
    return [
        {"name": "big", "url": BIG, "fallbacks": ["small-alias"], **big},
        {"name": "small", "aliases": ["small-alias"], "url": SMALL},
    ]


# The reasons.


async def test_a_model_with_no_replica_to_take_it_falls_back_and_the_answer_names_the_fallback(
    closing: list[Gateway],
) -> None:
    gw = Gateway({BIG: refused(), SMALL: answering("small")}, two())
    closing.append(gw)
    answer = await gw.chat("big")
    assert answer.status_code == 200
    assert answer.headers["x-vllm-gateway-model"] == "small"
    assert gw.sent_to() == [BIG, SMALL]
    assert gw.sent_model(SMALL) == "small"  # the body names the fallback: vLLM checks it
    assert answer.json()["model"] == "small"
    fallbacks = "vllm_gateway_fallbacks_total"
    assert await gw.metric(fallbacks, model="big", to="small", reason="unavailable") == 1
    requests = "vllm_gateway_requests_total"
    assert await gw.metric(requests, model="small", endpoint="/v1/chat/completions", status="200")


async def test_an_answer_without_a_fallback_names_its_own_model(closing: list[Gateway]) -> None:
    gw = Gateway({BIG: answering("big"), SMALL: answering("small")}, two())
    closing.append(gw)
    answer = await gw.chat("big")
    assert (answer.status_code, answer.headers["x-vllm-gateway-model"]) == (200, "big")
    assert gw.sent_to() == [BIG]
    assert await gw.metric("vllm_gateway_fallbacks_total", model="big", to="small") == 0


@pytest.mark.parametrize("status", [429, 503])
async def test_vllm_answering_overloaded_falls_back(closing: list[Gateway], status: int) -> None:
    busy = always(lambda: vllm_error(status, "The server is overloaded."))
    gw = Gateway({BIG: busy, SMALL: answering("small")}, two())
    closing.append(gw)
    answer = await gw.chat("big")
    assert (answer.status_code, answer.headers["x-vllm-gateway-model"]) == (200, "small")
    reason = "overloaded"
    assert await gw.metric("vllm_gateway_fallbacks_total", model="big", to="small", reason=reason)


async def test_no_first_byte_within_the_models_own_first_byte_falls_back(
    closing: list[Gateway],
) -> None:
    # The top-level first_byte is 900 s: only big's own can have run out.
    gw = Gateway({BIG: silent(), SMALL: answering("small")}, two(timeouts={"first_byte": 0.05}))
    closing.append(gw)
    answer = await gw.chat("big")
    assert (answer.status_code, answer.headers["x-vllm-gateway-model"]) == (200, "small")
    assert gw.sent_to() == [BIG, SMALL]
    assert await gw.metric(
        "vllm_gateway_fallbacks_total", model="big", to="small", reason="timeout"
    )


async def test_a_prompt_too_long_goes_only_to_a_fallback_whose_context_holds_it(
    closing: list[Gateway],
) -> None:
    models = [
        {"name": "big", "url": BIG, "fallbacks": ["mid", "small"]},
        {"name": "mid", "url": MID},
        {"name": "small", "url": SMALL},
    ]
    backends = {
        BIG: always(lambda: vllm_error(400, TOO_LONG)),
        MID: answering("mid", max_model_len=2048),  # no longer than big's: passed over
        SMALL: answering("small", max_model_len=32768),
    }
    gw = Gateway(backends, models)
    closing.append(gw)
    answer = await gw.chat("big")
    assert (answer.status_code, answer.headers["x-vllm-gateway-model"]) == (200, "small")
    assert gw.sent_to() == [BIG, SMALL]
    metric = "vllm_gateway_fallbacks_total"
    assert await gw.metric(metric, model="big", to="small", reason="context_length") == 1


async def test_a_prompt_too_long_for_every_fallback_gets_vllms_own_400(
    closing: list[Gateway],
) -> None:
    backends = {BIG: always(lambda: vllm_error(400, TOO_LONG)), SMALL: answering("small", 2048)}
    gw = Gateway(backends, two())
    closing.append(gw)
    answer = await gw.chat("big")
    assert answer.status_code == 400 and answer.json()["error"]["message"] == TOO_LONG
    assert answer.headers["x-vllm-gateway-model"] == "big" and gw.sent_to() == [BIG]


async def test_any_other_400_is_the_clients_and_never_falls_back(closing: list[Gateway]) -> None:
    bad = always(lambda: vllm_error(400, "temperature must be non-negative, got -1."))
    gw = Gateway({BIG: bad, SMALL: answering("small")}, two())
    closing.append(gw)
    answer = await gw.chat("big", temperature=-1)
    assert answer.status_code == 400 and "temperature" in answer.json()["error"]["message"]
    assert gw.sent_to() == [BIG]


async def test_a_reason_left_out_of_fallback_on_does_not_fall_back(
    closing: list[Gateway],
) -> None:
    gw = Gateway({BIG: refused(), SMALL: answering("small")}, two(fallback_on=["overloaded"]))
    closing.append(gw)
    answer = await gw.chat("big")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "backend_unavailable"
    assert gw.sent_to() == [BIG]


async def test_a_fallbacks_own_fallbacks_follow_it_and_each_move_is_counted_and_logged(
    closing: list[Gateway], capfd: pytest.CaptureFixture[str]
) -> None:
    models = [
        {"name": "big", "url": BIG, "fallbacks": ["mid"]},
        {"name": "mid", "url": MID, "fallbacks": ["small"]},
        {"name": "small", "url": SMALL},
    ]
    backends = {BIG: refused(), MID: always(lambda: vllm_error(429, "busy")), SMALL: answering("s")}
    gw = Gateway(backends, models, access_log=True)
    closing.append(gw)
    answer = await gw.chat("big")
    assert (answer.status_code, answer.headers["x-vllm-gateway-model"]) == (200, "small")
    assert gw.sent_to() == [BIG, MID, SMALL]
    metric = "vllm_gateway_fallbacks_total"
    assert await gw.metric(metric, model="big", to="mid", reason="unavailable") == 1
    assert await gw.metric(metric, model="mid", to="small", reason="overloaded") == 1
    moves = "fallbacks=big->mid:unavailable,mid->small:overloaded"
    out = Output(capfd)
    await until(lambda: out.has(moves), what="the access-log line")
    line = next(line for line in out.text.splitlines() if moves in line)
    assert "model=small" in line and "status=200" in line


async def test_when_every_fallback_fails_the_client_gets_the_last_failure(
    closing: list[Gateway],
) -> None:
    busy = always(lambda: vllm_error(429, "busy"))
    gw = Gateway({BIG: refused(), SMALL: busy}, two())
    closing.append(gw)
    answer = await gw.chat("big")
    assert answer.status_code == 429 and answer.headers["x-vllm-gateway-model"] == "small"
    assert gw.sent_to() == [BIG, SMALL]


# Who may reach what.


async def test_a_key_that_may_not_call_the_fallback_never_reaches_it(
    closing: list[Gateway],
) -> None:
    gw = Gateway({BIG: refused(), SMALL: answering("small")}, two())
    closing.append(gw)
    answer = await gw.chat("big", key="sk-big")
    assert answer.status_code == 503 and "small" not in answer.text
    assert gw.sent_to() == [BIG]
    assert (await gw.chat("small", key="sk-big")).status_code == 404  # as if it did not exist


async def test_an_adapter_falls_back_only_to_what_is_named_for_it(closing: list[Gateway]) -> None:
    models = [
        {
            "name": "big",
            "url": BIG,
            "adapters": ["sql", "poetry"],
            "fallbacks": ["mid"],  # the base model's: not an adapter's
            "adapter_fallbacks": {"sql": ["small"]},
        },
        {"name": "mid", "url": MID},
        {"name": "small", "url": SMALL},
    ]
    backends = {BIG: answering("big"), MID: answering("mid"), SMALL: answering("small")}
    gw = Gateway(backends, models)
    closing.append(gw)
    # No replica of big serves an adapter yet (none reported it): each is unavailable.
    sql = await gw.chat("sql")
    assert (sql.status_code, sql.headers["x-vllm-gateway-model"]) == (200, "small")
    assert gw.sent_model(SMALL) == "small"
    poetry = await gw.chat("poetry")
    assert poetry.status_code == 503 and poetry.json()["error"]["code"] == "backend_unavailable"
    assert gw.sent_to() == [SMALL]  # never mid, the base model's fallback


# Never once a byte went out.


async def test_a_stream_that_breaks_after_its_head_is_cut_and_never_falls_back(
    closing: list[Gateway],
) -> None:
    stream = Reply.stream([b'{"n": 1}'], more=True)

    async def big(sent: Sent) -> Reply:
        return stream

    gw = Gateway({BIG: big, SMALL: answering("small")}, two())
    closing.append(gw)
    answer = asyncio.create_task(gw.chat("big", stream=True))
    await asyncio.wait_for(stream.reading.wait(), 10)  # the head and the first event are out
    stream.cut()
    response = await answer
    assert response.status_code == 200 and response.headers["x-vllm-gateway-model"] == "big"
    assert response.text.startswith('data: {"n": 1}') and '"error"' in response.text
    assert gw.sent_to() == [BIG]


async def test_a_stream_silent_past_its_models_own_idle_is_cut_not_moved(
    closing: list[Gateway],
) -> None:
    stream = Reply.stream([b'{"n": 1}'], more=True)  # and then nothing

    async def big(sent: Sent) -> Reply:
        return stream

    gw = Gateway({BIG: big, SMALL: answering("small")}, two(timeouts={"idle": 0.05}))
    closing.append(gw)
    response = await gw.chat("big", stream=True)
    assert response.status_code == 200 and "upstream_timeout" in response.text
    assert gw.sent_to() == [BIG] and stream.closed  # vLLM learns to abort


# Per-model timeouts.


async def test_a_models_own_connect_timeout_is_the_one_its_connections_get(
    closing: list[Gateway],
) -> None:
    models = [
        {"name": "big", "url": BIG, "timeouts": {"connect": 2.5}},
        {"name": "small", "url": SMALL},
    ]
    gw = Gateway(
        {BIG: answering("big"), SMALL: answering("small")}, models, timeouts={"connect": 7}
    )
    closing.append(gw)
    await gw.chat("big")
    await gw.chat("small")
    assert gw.upstreams.connect_timeouts == {BIG: 2.5, SMALL: 7}


async def test_without_a_fallback_a_models_own_first_byte_answers_504(
    closing: list[Gateway],
) -> None:
    models = [{"name": "big", "url": BIG, "timeouts": {"first_byte": 0.05}}]
    gw = Gateway({BIG: silent()}, models)
    closing.append(gw)
    answer = await gw.chat("big")
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout"


# The config, and a reload.


def test_fallbacks_to_unknown_models_and_cycles_are_config_errors_listed_at_once() -> None:
    models = [
        {"name": "a", "url": BIG, "fallbacks": ["b", "nope"]},
        {"name": "b", "aliases": ["bee"], "url": MID, "fallbacks": ["c"]},
        {"name": "c", "url": SMALL, "fallbacks": ["bee"]},
        {"name": "d", "url": SMALL, "fallbacks": ["d"]},
    ]
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"models": models}, env={})
    assert info.value.problems == [
        "models[0].fallbacks[1]: model 'nope' is not configured",
        "models[1].fallbacks: a cycle: b -> c -> b",
        "models[3].fallbacks: a cycle: d -> d",
    ]


def test_fallback_settings_that_would_do_nothing_are_errors() -> None:
    models = [
        {"name": "a", "url": BIG, "fallback_on": ["timeout"]},
        {"name": "b", "url": MID, "adapter_fallbacks": {"sql": ["a"]}},
        {"name": "c", "url": SMALL, "fallbacks": ["a", "a"]},
    ]
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"models": models}, env={})
    assert info.value.problems == [
        "models[0].fallback_on: applies only with `fallbacks` or `adapter_fallbacks`",
        "models[1].adapter_fallbacks.sql: is not an adapter this model names "
        "(`vllm.lora.adapters`, or `adapters`)",
        "models[2].fallbacks: a name is listed twice",
    ]


async def test_a_reload_applies_fallbacks_and_timeouts_in_place(
    closing: list[Gateway], tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    keys = [*KEYS, {"name": "admin", "key": "sk-admin", "admin": True}]
    before = {"models": [{"name": "big", "url": BIG}, two()[1]], "api_keys": keys}
    path.write_text(yaml.safe_dump(before))
    gw = Gateway({BIG: silent(), SMALL: answering("small")}, config_path=path, **before)
    closing.append(gw)
    after = {"models": two(timeouts={"first_byte": 0.05}), "api_keys": keys}
    path.write_text(yaml.safe_dump(after))
    reloaded = await gw.client.post("/admin/reload", headers=bearer("sk-admin"))
    assert reloaded.status_code == 200, reloaded.text
    plan = {m["name"]: m["action"] for m in reloaded.json()["models"]}
    assert plan == {"big": "update", "small": "unchanged"}
    answer = await gw.chat("big")  # big is silent: its new first_byte ends, small answers
    assert (answer.status_code, answer.headers["x-vllm-gateway-model"]) == (200, "small")


async def test_an_unreachable_fallback_is_tried_once_and_the_error_is_its_own(
    closing: list[Gateway],
) -> None:
    async def down(sent: Sent) -> Reply:
        raise ConnectFailed("refused")

    gw = Gateway({BIG: always(lambda: vllm_error(503, "busy")), SMALL: down}, two())
    closing.append(gw)
    answer = await gw.chat("big")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "backend_unavailable"
    assert gw.sent_to() == [BIG, SMALL]
