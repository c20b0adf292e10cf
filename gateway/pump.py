"""The body's way to the client: relayed chunk by chunk as it arrives, or cut when it breaks.

This loop is the data plane's hot path (load/results/relay-client-2026-11-30.md): per chunk it
reads the clock once and sends, and nothing else. Token usage is read once the body is done,
from the last chunks (``gateway.usage``); a stream whose client did not ask for usage has the
usage event cut out on its way (``UsageStripper``).
"""

from __future__ import annotations

import time

from gateway.errors import GatewayError, sse_error_event
from gateway.interrupt import Interrupter
from gateway.record import RequestRecord
from gateway.types import Send
from gateway.upstream import UpstreamResponse
from gateway.usage import TAIL_BYTES, UsageStripper, find_usage


async def pump(
    response: UpstreamResponse,
    stripper: UsageStripper | None,
    send: Send,
    guard: Interrupter,
    record: RequestRecord,
    first: bytes,
) -> None:
    """Relay the body as it arrives (``first``: what was read already). Per chunk: a clock
    read and a send, nothing else; the last bytes, when they come with the response's end,
    go in the closing message."""
    stripper = stripper if record.stream else None
    previous = last = b""
    more, chunk = True, first
    while more and (chunk or (chunk := await response.readany())):
        guard.touch()
        if stripper is not None and not (chunk := stripper.feed(chunk)):
            continue
        if record.ttfb is None:
            record.ttfb = time.perf_counter() - record.started
            if record.trace is not None:  # [trace: the client's first byte]
                record.trace.first_byte()
        more = stripper is not None or not response.complete
        await send({"type": "http.response.body", "body": chunk, "more_body": more})
        previous, last, chunk = last, chunk, b""
    if stripper is not None and (rest := stripper.flush()):
        await send({"type": "http.response.body", "body": rest, "more_body": True})
    if more:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    if record.status == 200:
        tail = (previous + last)[-TAIL_BYTES:]
        record.usage = stripper.usage if stripper is not None else find_usage(tail)


async def cut(send: Send, error: GatewayError, record: RequestRecord) -> None:
    """A response broken after its head went out: a stream ends with the error event and
    [DONE]; a JSON body stays truncated (the truth), and the connection closes."""
    record.error = error.code
    if not record.stream:
        return
    try:
        body = sse_error_event(error)
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        pass  # the client is gone too
