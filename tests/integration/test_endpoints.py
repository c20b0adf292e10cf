"""Every routed endpoint, through the gateway and directly, against real vLLM CPU servers.

The gateway must be invisible: the same status, the same body (ids and timestamps aside), the
same stream event by event. Clients are the official OpenAI SDK and raw httpx.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import KEY, MONITOR_KEY
from tests.servers import GatewayProcess

MONITOR = {"Authorization": f"Bearer {MONITOR_KEY}"}

pytestmark = pytest.mark.vllm
VOLATILE = {"id", "created", "request_id"}


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)


def direct_client(vllm: dict[str, str], model: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm[model]}/v1", api_key="unused", max_retries=0)


def scrub(value: Any) -> Any:
    """The response without the fields that differ on every call. Floats are rounded: the CPU
    build's scores differ in the 7th digit when two requests are batched differently."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, float):
        return round(value, 5)
    return value


CHAT = {
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 12,
    "temperature": 0,
    "seed": 7,
}


def test_chat_via_sdk_matches_direct(client: openai.OpenAI, vllm: dict[str, str]) -> None:
    via = client.chat.completions.create(model="tiny-chat", **CHAT)
    direct = direct_client(vllm, "tiny-chat").chat.completions.create(model="tiny-chat", **CHAT)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage == direct.usage
    assert via.model == "tiny-chat"


def test_alias_is_answered_under_the_canonical_name(client: openai.OpenAI) -> None:
    assert client.chat.completions.create(model="chat", **CHAT).model == "tiny-chat"


def stream_events(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[Any]:
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    return [e if e == "[DONE]" else scrub(json.loads(e)) for e in events]


def merged(events: list[Any]) -> dict[str, Any]:
    """A stream's meaning: its text per field, finish reasons, usage, the event shapes.

    vLLM itself merges several tokens into one event when its consumer lags (seen under a
    loaded CPU), so event boundaries differ between two runs of the same request; byte-exact
    relaying is proven against the fake (tests/gateway/test_relay.py).
    """
    text: dict[str, str] = {}
    finish, usage, shapes = [], None, set()
    for event in events[:-1]:
        shapes.add(tuple(sorted(event)))
        for choice in event.get("choices", []):
            for field, value in (choice.get("delta") or {}).items():
                if isinstance(value, str):
                    text[field] = text.get(field, "") + value
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
        usage = event.get("usage") or usage
    return {"text": text, "finish": finish, "usage": usage, "shapes": shapes, "end": events[-1]}


@pytest.mark.parametrize("model", ["tiny-chat", "tiny-reasoner"])
def test_stream_matches_direct(gateway: GatewayProcess, vllm: dict[str, str], model: str) -> None:
    body = {**CHAT, "model": model, "stream": True, "stream_options": {"include_usage": True}}
    via = stream_events(
        f"{gateway.url}/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"}
    )
    direct = stream_events(f"{vllm[model]}/v1/chat/completions", body, {})
    assert merged(via) == merged(direct)
    assert via[-1] == "[DONE]" and via[-2]["usage"]["completion_tokens"] == 12


def test_stream_without_usage_is_exactly_vllms_and_counts_no_tokens(
    gateway: GatewayProcess, vllm: dict[str, str]
) -> None:
    """The default (stream_usage: client): a stream that did not ask for usage is not touched.

    Asking real vLLM for usage on the client's behalf would move `system_fingerprint` out of the
    last content event (seen here), which is why `stream_usage: always` is opt-in.
    """
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {**CHAT, "model": "tiny-chat", "stream": True}
    before = tokens_counted(gateway)
    via = stream_events(f"{gateway.url}/v1/chat/completions", body, headers)
    direct = stream_events(f"{vllm['tiny-chat']}/v1/chat/completions", body, {})
    assert merged(via) == merged(direct)  # system_fingerprint included: not asked for usage
    assert tokens_counted(gateway) == before
    with_usage = {**body, "stream_options": {"include_usage": True}}
    stream_events(f"{gateway.url}/v1/chat/completions", with_usage, headers)
    assert tokens_counted(gateway) - before == 12


def test_messages_and_responses_count_their_tokens(gateway: GatewayProcess) -> None:
    """The Messages and Responses APIs report input/output tokens, streams included."""
    headers = {"Authorization": f"Bearer {KEY}"}
    messages = {
        "model": "tiny-chat",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    responses = {"model": "tiny-chat", "input": "hi", "max_output_tokens": 5, "temperature": 0}
    before = tokens_counted(gateway)
    reported = 0
    for path, body in [("/v1/messages", messages), ("/v1/responses", responses)]:
        answer = httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=60)
        reported += answer.json()["usage"]["output_tokens"]
        with httpx.stream(
            "POST",
            f"{gateway.url}{path}",
            json={**body, "stream": True},
            headers=headers,
            timeout=60,
        ) as stream:
            events = stream.read().decode()
        assert stream.status_code == 200 and "event:" in events, path
        reported += int(re.findall(r'"output_tokens":(\d+)', events)[-1])  # its final event
    assert reported > 0
    assert tokens_counted(gateway) - before == reported


def tokens_counted(gateway: GatewayProcess) -> float:
    text = httpx.get(f"{gateway.url}/metrics", headers=MONITOR).text
    wanted = {"model": "tiny-chat", "key": "config-1", "kind": "completion"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vllm_gateway_tokens_total" and sample.labels == wanted
    )


def test_backend_metrics_are_relayed(gateway: GatewayProcess) -> None:
    response = httpx.get(f"{gateway.url}/backends/tiny-chat/metrics", headers=MONITOR)
    assert response.status_code == 200
    assert "vllm:num_requests_running{" in response.text


def test_reasoning_field_reaches_the_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny-reasoner", stream=True, **CHAT)
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    reasoning = [
        getattr(d, "reasoning", None) or (d.model_extra or {}).get("reasoning") for d in deltas
    ]
    assert any(reasoning), "deepseek_r1's parser puts the tiny model's output in `reasoning`"


def test_completions_match_direct(client: openai.OpenAI, vllm: dict[str, str]) -> None:
    args = {"model": "tiny-chat", "prompt": "the cat", "max_tokens": 8, "temperature": 0}
    via = client.completions.create(**args)
    direct = direct_client(vllm, "tiny-chat").completions.create(**args)
    assert via.choices[0].text == direct.choices[0].text


def test_embeddings_identical_to_direct(client: openai.OpenAI, vllm: dict[str, str]) -> None:
    inputs = ["the quick brown fox", "a gateway in front of vllm"]
    via = client.embeddings.create(model="tiny-embed", input=inputs)
    direct = direct_client(vllm, "tiny-embed").embeddings.create(model="tiny-embed", input=inputs)
    assert [d.embedding for d in via.data] == [d.embedding for d in direct.data]
    assert len(via.data[0].embedding) == 128


def post_both(
    gateway: GatewayProcess, vllm: dict[str, str], model: str, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response]:
    via = httpx.post(
        f"{gateway.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    direct = httpx.post(f"{vllm[model]}{path}", json=body, timeout=60)
    return via, direct


RERANK = {
    "model": "tiny-rerank",
    "query": "where is the cat",
    "documents": ["the cat sat", "dogs run fast", "paris is a city"],
    "top_n": 2,
}
SCORE = {"model": "tiny-rerank", "text_1": "where is the cat", "text_2": ["the cat sat", "dogs"]}
CASES = [
    ("tiny-rerank", "/v1/rerank", RERANK),
    ("tiny-rerank", "/rerank", RERANK),
    ("tiny-rerank", "/v2/rerank", RERANK),
    ("tiny-rerank", "/score", SCORE),
    ("tiny-rerank", "/v1/score", SCORE),
    ("tiny-rerank", "/classify", {"model": "tiny-rerank", "input": ["the cat sat"]}),
    ("tiny-embed", "/pooling", {"model": "tiny-embed", "input": "the cat sat"}),
    ("tiny-chat", "/tokenize", {"model": "tiny-chat", "prompt": "the cat sat"}),
    ("tiny-chat", "/detokenize", {"model": "tiny-chat", "tokens": [5, 6, 7]}),
    (
        "tiny-chat",
        "/v1/messages/count_tokens",
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "tiny-chat",
        "/v1/messages",
        {"model": "tiny-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "tiny-embed",
        "/v2/embed",  # Cohere's embed API
        {
            "model": "tiny-embed",
            "texts": ["a", "b c"],
            "input_type": "search_document",
            "embedding_types": ["float"],
        },
    ),
    (
        "tiny-chat",
        "/v1/responses",
        {"model": "tiny-chat", "input": "hi", "max_output_tokens": 5, "temperature": 0},
    ),
]


@pytest.mark.parametrize(("model", "path", "body"), CASES, ids=[c[1] for c in CASES])
def test_endpoint_matches_direct(
    gateway: GatewayProcess, vllm: dict[str, str], model: str, path: str, body: dict[str, Any]
) -> None:
    via, direct = post_both(gateway, vllm, model, path, body)
    assert via.status_code == direct.status_code
    assert via.headers["content-type"] == direct.headers["content-type"]
    if path in ("/v1/messages", "/v1/responses"):
        assert via.status_code == 200  # generated text may differ in ids only
        assert via.json().keys() == direct.json().keys()
    else:
        assert scrub(via.json()) == scrub(direct.json())


def test_rerank_ranks_by_score(gateway: GatewayProcess) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/rerank", json=RERANK, headers={"Authorization": f"Bearer {KEY}"}
    )
    scores = [r["relevance_score"] for r in response.json()["results"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)


def test_audio_is_routed_by_its_form_field(gateway: GatewayProcess, vllm: dict[str, str]) -> None:
    """No speech model here: the chat server answers the upload itself (its own 404)."""
    files = {"file": ("a.wav", b"RIFF0000WAVE", "audio/wav")}
    via = httpx.post(
        f"{gateway.url}/v1/audio/transcriptions",
        data={"model": "tiny-chat"},
        files=files,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    direct = httpx.post(
        f"{vllm['tiny-chat']}/v1/audio/transcriptions", data={"model": "tiny-chat"}, files=files
    )
    assert via.status_code == direct.status_code
    assert via.content == direct.content
    no_model = httpx.post(
        f"{gateway.url}/v1/audio/transcriptions",
        files=files,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert no_model.status_code == 400


def test_models_list_names_aliases_and_context_length(client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) >= {"tiny-chat", "chat", "tiny-reasoner", "tiny-embed", "tiny-rerank"}
    assert cards["chat"].model_extra["max_model_len"] == 1024
    assert cards["tiny-embed"].model_extra["max_model_len"] == 512


def test_sdk_sees_the_right_exceptions(gateway: GatewayProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="Available models"):
        client.chat.completions.create(model="gpt-4o", **CHAT)
    wrong_key = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.chat.completions.create(model="tiny-chat", **CHAT)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="nobody-home", **CHAT)
    assert info.value.status_code == 503 and "nobody-home" in info.value.message
    with pytest.raises(openai.BadRequestError):  # vLLM's own 400, passed through
        client.chat.completions.create(model="tiny-chat", messages=[], max_tokens=-1)
