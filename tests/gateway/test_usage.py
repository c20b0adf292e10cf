"""Token counts come from the backend's `usage`; an added usage event never reaches the client."""

from __future__ import annotations

import orjson
import pytest

from gateway.usage import UsageStripper, ask_for_usage, find_usage

CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi \\"usage\\":"}}]}\n\n'
USAGE = (
    b'data: {"id":"c","choices":[],'
    b'"usage":{"prompt_tokens":7,"total_tokens":12,"completion_tokens":5}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def test_usage_is_read_from_the_end_of_a_response() -> None:
    body = orjson.dumps(
        {
            "choices": [{"text": '"usage": {"prompt_tokens": 1}'}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        }
    )
    assert find_usage(body) == (3, 4)
    assert find_usage(b'{"data": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}}') == (9, 0)
    assert find_usage(b'{"usage": null}') is None


def test_the_responses_and_messages_apis_count_input_and_output_tokens() -> None:
    """Their usage objects nest details, and their streams end with their own events."""
    response = (
        b'"output":[],"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},'
        b'"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":16},'
        b'"user":null}'
    )
    assert find_usage(response) == (11, 5)
    messages_stream = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"max_tokens"},"usage":{"input_tokens":8,"output_tokens":5}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert find_usage(messages_stream) == (8, 5)
    assert find_usage(b'"usage":{"input_tokens":8,"output_tokens":5') is None  # cut short


def test_only_streams_without_a_usage_choice_are_changed() -> None:
    doc = {"model": "m", "stream": True}
    assert ask_for_usage("/v1/chat/completions", doc) == {
        **doc,
        "stream_options": {"include_usage": True},
    }
    assert ask_for_usage("/v1/chat/completions", {**doc, "stream": False}) is None
    assert ask_for_usage("/v1/embeddings", doc) is None
    chosen = {**doc, "stream_options": {"include_usage": False}}
    assert ask_for_usage("/v1/completions", chosen) is None


@pytest.mark.parametrize(
    "chunks",
    [
        [CHUNK, CHUNK, USAGE, DONE],  # one event per chunk
        [CHUNK + CHUNK + USAGE + DONE],  # all in one
        [CHUNK, CHUNK + USAGE[:30], USAGE[30:] + DONE],  # the usage event split
        [CHUNK, USAGE[:-1], b"\n" + DONE],
    ],
)
def test_the_added_usage_event_is_cut_and_everything_else_kept(chunks: list[bytes]) -> None:
    stripper = UsageStripper()
    relayed = b"".join(stripper.feed(c) for c in chunks) + stripper.flush()
    assert relayed == b"".join(chunks).replace(USAGE, b"")
    assert stripper.usage == (7, 5)
