"""An exception the gateway does not expect is a bug: the outer boundary logs its traceback
exactly once and answers OpenAI's 500 `internal_error` (Anthropic's on the Messages API) with
the request id; a stream it cuts ends with the error event and [DONE]. Exceptions are injected
before the backend is asked, mid-stream, after the body, and in the control API. Failures the
gateway knows (a backend refusing, dying mid-stream) map as before, with no traceback."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import orjson
import pytest

from backends.pool import ReplicaPool
from gateway import pump as pump_module
from gateway.app import create_app
from gateway.config_file import settings_from_dict
from gateway.inprocess import Reply, refused, script
from gateway.status import StatusReport
from gateway.usage import UsageStripper
from tests.gateway.relays import InProcessRelay

A = "http://a.test"


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None]


def bug(*_: object, **__: object) -> Any:
    raise KeyError("injected")


def openai_500(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert (error["type"], error["code"]) == ("internal_error", "internal_error")
    return error


async def test_a_bug_before_the_backend_is_asked_is_a_500_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ReplicaPool, "pick", bug)
    relay = InProcessRelay({A: script(Reply.json({}))})
    call = await relay.call().done()
    assert call.status == 500 and call.headers[b"x-request-id"] == b"req-1"
    assert "req-1" in openai_500(call.body)["message"]
    [logged] = tracebacks(caplog)
    assert logged.exc_info is not None and logged.exc_info[0] is KeyError
    assert "req-1" in logged.getMessage()
    assert relay.upstreams.sent == []
    assert (relay.record.status, relay.record.error) == (500, "internal_error")


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_on_the_messages_api_the_500_is_anthropic_shaped(
    path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ReplicaPool, "pick", bug)
    call = await InProcessRelay({A: script(Reply.json({}))}).call(path).done()
    body = orjson.loads(call.body)
    assert call.status == 500 and body["type"] == "error"
    assert body["error"]["type"] == "api_error" and "req-1" in body["error"]["message"]
    assert len(tracebacks(caplog)) == 1


async def test_a_bug_mid_stream_ends_it_with_the_error_event_and_done(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected into usage counting, as the stream's second event passes through it."""
    feed = UsageStripper.feed
    seen: list[bytes] = []

    def failing_feed(self: UsageStripper, chunk: bytes) -> bytes:
        seen.append(chunk)
        return bug() if len(seen) == 2 else feed(self, chunk)

    monkeypatch.setattr(UsageStripper, "feed", failing_feed)
    reply = Reply.stream([b'{"n": 1}'], more=True)
    relay = InProcessRelay({A: script(reply)}, usage_for_all_streams=True)
    call = relay.call(stream=True).start()
    await call.until(lambda: b'{"n": 1}' in call.body)
    reply.feed(b'data: {"n": 2}\n\n')
    await call.done()
    events = call.body.split(b"\n\n")
    assert events[0] == b'data: {"n": 1}' and events[2:] == [b"data: [DONE]", b""]
    assert "req-1" in openai_500(events[1].removeprefix(b"data: "))["message"]
    assert len(tracebacks(caplog)) == 1
    assert reply.closed and relay.replicas[0].in_flight == 0 and relay.pool.open_streams == 0
    assert relay.record.error == "internal_error"


class BrokenBelow(Reply):
    """A response whose second read hits a bug (no failure the HTTP client knows)."""

    reads = 0

    async def readany(self) -> bytes:
        self.reads += 1
        return bug() if self.reads == 2 else await super().readany()


async def test_a_bug_after_a_json_head_cuts_the_body(caplog: pytest.LogCaptureFixture) -> None:
    """The client must not take a truncated answer for a whole one: no end is sent, and the
    server closes the connection."""
    reply = BrokenBelow(200, [(b"content-type", b"application/json")], [b'{"id": '], more=True)
    relay = InProcessRelay({A: script(reply)})
    call = await relay.call().done()
    assert call.status == 200 and call.body == b'{"id": ' and not call.ended
    assert len(tracebacks(caplog)) == 1 and reply.closed


async def test_a_bug_after_the_body_ended_is_still_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer was whole: the client keeps its 200; the log and the metrics show the bug."""
    monkeypatch.setattr(pump_module, "find_usage", bug)
    relay = InProcessRelay({A: script(Reply.json({"id": "x"}))})
    call = await relay.call().done()
    assert call.status == 200 and call.ended and orjson.loads(call.body) == {"id": "x"}
    assert len(tracebacks(caplog)) == 1
    assert (relay.record.status, relay.record.error) == (500, "internal_error")


async def test_known_upstream_failures_map_as_before_with_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    call = await InProcessRelay({A: refused()}).call().done()
    assert call.status == 503
    assert orjson.loads(call.body)["error"]["code"] == "backend_unavailable"
    reply = Reply.stream([b"{}"], more=True)
    cut = InProcessRelay({A: script(reply)}).call(stream=True).start()
    await cut.until(lambda: bool(cut.body))
    reply.cut()
    await cut.done()
    assert b'"code":"bad_gateway"' in cut.body and cut.body.endswith(b"data: [DONE]\n\n")
    assert tracebacks(caplog) == []


def control_app(**settings: Any) -> httpx.AsyncClient:
    models = [{"name": "m", "url": "http://127.0.0.1:9"}]
    app = create_app(settings_from_dict({"models": models, **settings}, env={}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_a_bug_in_the_control_api_is_a_500_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StatusReport, "document", bug)
    async with control_app() as client:
        answer = await client.get("/status.json", headers={"x-request-id": "req-2"})
        assert (await client.get("/health")).status_code == 200  # and it serves on
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "req-2"
    assert "req-2" in openai_500(answer.content)["message"]
    [logged] = tracebacks(caplog)
    assert logged.exc_info is not None and logged.exc_info[0] is KeyError


async def test_a_500_carries_cors_headers_so_a_browser_can_read_it(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StatusReport, "document", bug)
    async with control_app(cors={"allowed_origins": ["https://app.example"]}) as client:
        answer = await client.get("/status.json", headers={"Origin": "https://app.example"})
    assert answer.status_code == 500
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    assert len(tracebacks(caplog)) == 1
