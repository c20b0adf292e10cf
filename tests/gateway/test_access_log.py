"""The access log batches lines: one write per flush, not one per request, and none lost."""

from __future__ import annotations

import asyncio
import io
import json

from gateway.access_log import AccessLog
from gateway.record import RequestRecord
from tests.helpers import until


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def record(n: int) -> RequestRecord:
    return RequestRecord(f"req-{n}", "/v1/embeddings", model="embed", status=200)


def test_lines_written_together_on_the_next_flush() -> None:
    stream = CountingStream()
    log = AccessLog("json", stream)

    async def burst() -> None:
        for n in range(100):  # under one buffer (32 KB)
            log.write(record(n), 0.001)
        assert stream.writes == 0  # nothing yet: the lines wait for the timer
        await until(lambda: stream.writes > 0, what="the timer's flush")

    asyncio.run(burst())
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == [f"req-{n}" for n in range(100)]
    assert stream.writes == 1
    assert lines[0]["logger"] == "vllm_gateway.access" and lines[0]["time"].endswith("Z")


def test_a_full_buffer_is_written_at_once() -> None:
    stream = CountingStream()
    log = AccessLog("text", stream)

    async def flood() -> None:
        for n in range(2000):  # ~200 characters a line: several buffers' worth
            log.write(record(n), 0.001)
        assert 4 <= stream.writes < 20
        log.flush()

    asyncio.run(flood())
    assert stream.getvalue().count("\n") == 2000


def test_without_an_event_loop_each_line_is_written_at_once() -> None:
    stream = CountingStream()
    AccessLog("text", stream).write(record(1), 0.5)
    assert "latency_ms=500.0" in stream.getvalue()


def test_text_and_json_lines_carry_the_same_fields() -> None:
    records = [
        RequestRecord("r1", "/v1/chat/completions", key="team-a", model="m", status=200),
        RequestRecord("r2", "/v1/embeddings", status=502, ttfb=0.002, usage=(3, 0)),
        RequestRecord("r3", "/v1/chat/completions", status=200, stream=True, error="idle"),
    ]
    text, as_json = CountingStream(), CountingStream()
    for log in (AccessLog("text", text), AccessLog("json", as_json)):
        for each in records:
            log.write(each, 0.0125)
        log.flush()
    for text_line, json_line in zip(
        text.getvalue().splitlines(), as_json.getvalue().splitlines(), strict=True
    ):
        pairs = dict(pair.split("=", 1) for pair in text_line.split(": ", 1)[1].split(" "))
        fields = json.loads(json_line)
        del fields["time"], fields["level"], fields["logger"]
        assert pairs == {k: str(v) for k, v in fields.items()}
