"""The access log: one line per request relayed or refused, written in batches to the log stream.

Through `logging`, a line costs a LogRecord, the formatter, the handler's lock and one write
per line: a large share of a relayed request's CPU (docs/observability.md). Here a line is one
format call, and lines are written together every 0.1 s (sooner past 32 KB), so one write
carries every request finished meanwhile. Lines look like `gateway.logs`'s, text or JSON, and
go to the same stream (stderr); they may trail other log lines by up to 0.1 s. A request that
fell back names each move (`fallbacks=a->b:unavailable`); its `model` is the one that answered.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

import orjson

from gateway.logs import LogFormat
from gateway.record import RequestRecord

LOGGER = "vllm_gateway.access"  # the `logger` field, as if it came through logging
FLUSH_EVERY = 0.1  # seconds
FLUSH_SIZE = 32 * 1024  # characters


class AccessLog:
    def __init__(self, fmt: LogFormat, stream: TextIO | None = None) -> None:
        self._json = fmt == "json"
        self._stream = stream  # None: whatever sys.stderr is when the lines are written
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._clock = _SecondClock(utc=self._json)

    def write(self, record: RequestRecord, duration: float) -> None:
        stamp = self._clock.stamp(time.time())
        if self._json:
            entry = {"time": stamp, "level": "info", "logger": LOGGER, **_fields(record, duration)}
            self._add(orjson.dumps(entry).decode() + "\n")
        else:
            self._add(_text_line(stamp, record, duration))

    def action(self, key: str, action: str, model: str, result: str, duration: float) -> None:
        """One admin action: which key did what to which model, and how it ended."""
        stamp = self._clock.stamp(time.time())
        fields = {
            "action": action,
            "model": model,
            "key": key,
            "result": result,
            "latency_ms": round(duration * 1000, 2),
        }
        if self._json:
            entry = {"time": stamp, "level": "info", "logger": LOGGER, **fields}
            self._add(orjson.dumps(entry).decode() + "\n")
        else:
            pairs = " ".join(f"{name}={value}" for name, value in fields.items())
            self._add(f"{stamp} INFO {LOGGER}: {pairs}\n")

    def _add(self, text: str) -> None:
        self._lines.append(text)
        self._size += len(text)
        if self._size >= FLUSH_SIZE:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)
            except RuntimeError:  # no event loop: nothing would ever flush later
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        stream = self._stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # the log stream is gone (closed stderr): lose lines, never a request


def _fields(record: RequestRecord, duration: float) -> dict[str, object]:
    """Never a body, never a key: only the key's name."""
    fields: dict[str, object] = {
        "endpoint": record.endpoint,
        "status": record.status,
        "latency_ms": round(duration * 1000, 2),
        "model": record.model,
        "key": record.key,
        "backend": record.backend,
        "request_id": record.request_id,
        "stream": record.stream,
    }
    if record.ttfb is not None:
        fields["ttfb_ms"] = round(record.ttfb * 1000, 2)
    if record.start_wait is not None:
        fields["start_wait_ms"] = round(record.start_wait * 1000, 2)
    if record.queue_wait is not None:
        fields["queue_wait_ms"] = round(record.queue_wait * 1000, 2)
    if record.usage is not None:
        fields["prompt_tokens"], fields["completion_tokens"] = record.usage
    if record.error is not None:
        fields["error"] = record.error
    if record.fallbacks is not None:
        fields["fallbacks"] = [
            {"model": m.model, "to": m.to, "reason": m.reason} for m in record.fallbacks
        ]
    return fields


def _text_line(stamp: str, record: RequestRecord, duration: float) -> str:
    """The same fields as `_fields`, as name=value pairs: one f-string, no dict (half the cost)."""
    r = record
    line = (
        f"{stamp} INFO {LOGGER}: endpoint={r.endpoint} status={r.status} "
        f"latency_ms={round(duration * 1000, 2)} model={r.model} key={r.key} "
        f"backend={r.backend} request_id={r.request_id} stream={r.stream}"
    )
    if r.ttfb is not None:
        line += f" ttfb_ms={round(r.ttfb * 1000, 2)}"
    if r.start_wait is not None:
        line += f" start_wait_ms={round(r.start_wait * 1000, 2)}"
    if r.queue_wait is not None:
        line += f" queue_wait_ms={round(r.queue_wait * 1000, 2)}"
    if r.usage is not None:
        line += f" prompt_tokens={r.usage[0]} completion_tokens={r.usage[1]}"
    if r.error is not None:
        line += f" error={r.error}"
    if r.fallbacks is not None:
        line += " fallbacks=" + ",".join(f"{m.model}->{m.to}:{m.reason}" for m in r.fallbacks)
    return line + "\n"


class _SecondClock:
    """Timestamps as `gateway.logs` writes them, formatted once a second, not once a line."""

    def __init__(self, utc: bool) -> None:
        self._utc = utc
        self._second = -1
        self._prefix = ""

    def stamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            if self._utc:
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((now - second) * 1000)
        return f"{self._prefix}.{millis:03d}Z" if self._utc else f"{self._prefix},{millis:03d}"
