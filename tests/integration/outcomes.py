"""What became of one chat request sent while replicas come and go: the categories the
failover tests count, so each test asserts on the same words."""

from __future__ import annotations

import httpx

# What a client may see while a replica dies: every plain request answered, every stream ended.
ACCEPTED = {"plain 200", "stream complete", "stream cut, error event + [DONE]"}


def chat_outcome(
    url: str, model: str, headers: dict[str, str], stream: bool, max_tokens: int
) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        return f"exception {type(exc).__name__}"
    if not stream:
        return f"plain {answer.status_code}"
    events = [e for e in answer.text.split("\n\n") if e]
    if answer.status_code != 200 or not events or events[-1] != "data: [DONE]":
        return f"stream {answer.status_code} unterminated"
    if any('"error"' in e for e in events[:-1]):
        return "stream cut, error event + [DONE]"
    return "stream complete"
