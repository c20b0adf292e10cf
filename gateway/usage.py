"""Token counts from the backend's own `usage`, read without decoding what is relayed.

vLLM writes `usage` at the end of a response (after `choices` or `data`), and in a stream as the
last event before `[DONE]` (the Messages API: in `message_delta`; the Responses API: in
`response.completed`, which its streams always send). The relay keeps references to the last
few chunks it sent; once the response is complete, ``find_usage`` reads the counts from that
tail. Nothing is parsed per chunk.

Streams count their tokens when the client asked for usage (`stream_options.include_usage`),
the default (`stream_usage: client`): what the client receives is then exactly vLLM's stream.
With `stream_usage: always`, a streaming chat or completion that did not ask is sent upstream
with include_usage set, and the usage-only event this adds is cut from what the client receives
(``UsageStripper``). vLLM then also moves `system_fingerprint` from the last content event to
that usage event, so those clients stop seeing the fingerprint: the one change, and the reason
this is opt-in.
"""

from __future__ import annotations

import json
from typing import Any

USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
TAIL_BYTES = 4096

_MARKER = b'"usage":'
_DECODER = json.JSONDecoder()


def find_usage(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last `usage` object in ``tail``: OpenAI's
    `prompt_tokens` / `completion_tokens`, or the Responses and Messages APIs' `input_tokens` /
    `output_tokens` (whose usage objects nest details, so they are decoded, not matched)."""
    text = tail.decode("utf-8", "replace")
    at = text.rfind(_MARKER.decode())
    while at != -1:
        usage = _object_at(text, at + len(_MARKER))
        if usage is not None:
            return _counts(usage)
        at = text.rfind(_MARKER.decode(), 0, at)
    return None


def _object_at(text: str, start: int) -> dict[str, Any] | None:
    while start < len(text) and text[start] in " \t\r\n":
        start += 1
    if not text.startswith("{", start):
        return None
    try:
        value, _ = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _counts(usage: dict[str, Any]) -> tuple[int, int] | None:
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def ask_for_usage(path: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The request with include_usage set, when it streams without it; else None."""
    if path not in USAGE_PATHS or doc.get("stream") is not True:
        return None
    options = doc.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict) or "include_usage" in options:
        return None  # the client chose (or sent something vLLM will judge): leave it alone
    return {**doc, "stream_options": {**options, "include_usage": True}}


class UsageStripper:
    """Cuts the usage-only event out of a stream whose client did not ask for it.

    Only a chunk containing the `"usage":` marker is looked at (a JSON string cannot contain it
    unescaped, so generated text never matches); within it, the event whose `choices` is empty
    is removed. The counts are kept for metrics.
    """

    def __init__(self) -> None:
        self.usage: tuple[int, int] | None = None
        self._pending = b""  # the start of an event split across chunks

    def feed(self, chunk: bytes) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending + chunk, b""
        if not chunk.endswith(b"\n\n"):  # hold back an unfinished event: no use to a client
            boundary = chunk.rfind(b"\n\n")
            whole = boundary + 2 if boundary != -1 else 0
            chunk, self._pending = chunk[:whole], chunk[whole:]
        marker = chunk.find(_MARKER)
        if marker == -1:
            return chunk
        boundary = chunk.rfind(b"\n\n", 0, marker)
        start = boundary + 2 if boundary != -1 else 0
        end = chunk.find(b"\n\n", marker) + 2
        if b'"choices":[]' not in chunk[start:end]:
            return chunk
        self.usage = find_usage(chunk[start:end])
        return chunk[:start] + chunk[end:]

    def flush(self) -> bytes:
        pending, self._pending = self._pending, b""
        return pending
