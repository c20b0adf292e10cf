"""The client's side of a relayed request: the few head fields the gateway uses, and the body.

The body is read whole (routing needs its `model`) and bounded in size: a body larger than the
limit is refused as soon as that is known, without reading the rest. (A client that stops
sending half-way gets a 408 from the server protocol, ``gateway.server``.)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.traffic.priorities import PRIORITY_HEADER
from gateway.types import Receive

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
MAX_WAIT_HEADER = "x-vllm-gateway-max-wait"  # seconds the client waits for an on-demand model
_MAX_WAIT = MAX_WAIT_HEADER.encode()


@dataclass(frozen=True, slots=True)
class RequestHead:
    content_type: str
    content_length: int | None
    request_id: bytes  # the client's, when well-formed and short; else a new one
    max_wait: bytes | None = None  # its x-vllm-gateway-max-wait, as sent
    priority: bytes | None = None  # the priority header, as sent (gateway.traffic)


def read_head(headers: list[tuple[bytes, bytes]]) -> RequestHead:
    content_type = ""
    content_length: int | None = None
    request_id: bytes | None = None
    max_wait: bytes | None = None
    priority: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-type":
            content_type = value.decode("latin-1")
        elif lname == b"content-length" and value.isdigit():
            content_length = int(value)
        elif lname == b"x-request-id" and _REQUEST_ID.match(value):
            request_id = value
        elif lname == _MAX_WAIT:
            max_wait = value
        elif lname == PRIORITY_HEADER:
            priority = value
    request_id = request_id or new_request_id()
    return RequestHead(content_type, content_length, request_id, max_wait, priority)


def max_wait(head: RequestHead, default: float | None) -> float | None:
    """Seconds the client will wait for its on-demand model: its header, else its key's
    `max_wait`; None: as long as a start takes."""
    if head.max_wait is None:
        return default
    try:
        seconds = float(head.max_wait.decode("latin-1"))
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise InvalidRequest(
            f"{MAX_WAIT_HEADER} must be a positive number of seconds, not {head.max_wait!r}."
        )
    return seconds


def new_request_id() -> bytes:
    """128 random bits in hex, like a UUID4's: unique, not secret (a quarter of uuid4's cost)."""
    return b"%032x" % random.getrandbits(128)


async def read_body(receive: Receive, content_length: int | None, limit: int) -> bytes | None:
    """The whole request body, refused early when it cannot fit; None if the client left.

    A client too slow to send it is timed out by the server protocol (``gateway.server``),
    which answers 408 and closes the connection: this then sees the disconnect.
    """
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(_too_large(limit))
    return await _receive_all(receive, limit)


async def _receive_all(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(_too_large(limit))
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"The request body is larger than this gateway's limit of {limit} bytes."
