"""A request's prompt as stable bytes, for pools balanced by ``balance: prefix``.

vLLM's cache is keyed by the tokens its chat template makes of the request; the gateway has no
tokenizer, so it renders what decides those tokens, in the order a template puts them: tools,
then each message's role and content (Anthropic's `system` and the Responses API's
`instructions` first). The rendering of a conversation's turn is a byte prefix of the next
turn's, which is what lets a later turn find the replica that served the earlier ones; the
chained block hashes of ``backends.prefix_index`` do the rest.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson

from backends.kv_endpoints import kv_events_endpoint
from backends.kv_events import Endpoints
from backends.pool import Replica, ReplicaPool
from backends.prefix_index import PrefixPolicy, PrefixRouter
from backends.prompt_blocks import PromptBlocks
from backends.supervisor import Supervisor
from gateway.model_settings import ModelSettings

_MESSAGE = b"\x1e"  # before each message (ASCII record separator)
_ROLE = b"\x1f"  # between a message's role and its content (unit separator)
_BESIDE_MESSAGES = frozenset({"tools", "system", "instructions", "prompt", "input"})


def prefix_router(model: ModelSettings, current: PrefixRouter | None = None) -> PrefixRouter | None:
    """The prefix index of a model balanced by ``prefix``; None for the other policies.
    ``current``: the model's index before a reload, kept with all it learnt (and its knobs
    applied) unless its blocks change size, which makes every hash it holds another."""
    if model.balance != "prefix":
        return None
    knobs = model.prefix
    policy = PrefixPolicy(knobs.block_bytes, knobs.max_blocks, knobs.load_slack, knobs.load_ratio)
    if current is not None and current.policy.block_bytes == policy.block_bytes:
        current.policy = policy
        return current
    return PrefixRouter(policy)


def kv_event_endpoints(model: ModelSettings, supervisor: Supervisor) -> Endpoints | None:
    """Where each replica of a `balance: prefix` model publishes its KV-cache events: a spawned
    server on the endpoint ``backend_specs`` gave it, a replica of `urls` at the one listed for
    its URL, a discovered pod at its address on `prefix.kv_events_port`; None for a model with
    none. Asked again whenever the model's replicas change (``backends.kv_events``)."""
    if model.balance != "prefix":
        return None
    if model.vllm is not None:
        return partial(_spawned, supervisor)
    if model.prefix.kv_events:
        return partial(_listed, dict(zip(model.endpoints, model.prefix.kv_events, strict=True)))
    if model.discover is not None and model.prefix.kv_events_port is not None:
        return partial(_discovered, model.prefix.kv_events_port)
    return None


def _spawned(supervisor: Supervisor, replica: Replica) -> str | None:
    backend = supervisor.backend_of(replica)
    return kv_events_endpoint(backend.spec) if backend is not None else None


def _listed(by_url: dict[str, str], replica: Replica) -> str | None:
    return by_url.get(replica.url)


def _discovered(port: int, replica: Replica) -> str | None:
    if replica.address is None:
        return None
    host = replica.address.rsplit(":", 1)[0]  # `ip:port`, or `[ipv6]:port`
    return f"tcp://{host}:{port}"


def prompt_hashes(
    pool: ReplicaPool, doc: dict[str, Any], adapter: str | None
) -> PromptBlocks | None:
    """The chained block hashes of the request's prompt, if its pool routes by prefix and the
    request has a prompt (chat, completions, Anthropic messages, responses)."""
    router = pool.prefix
    if router is None:
        return None
    data = render(doc)
    return router.hashes(data, adapter) if data else None


def render(doc: dict[str, Any]) -> bytes:
    """The prompt-deciding parts of an OpenAI- or Anthropic-style body; empty if it has none."""
    messages = doc.get("messages")
    if type(messages) is list and doc.keys().isdisjoint(_BESIDE_MESSAGES):
        return _messages(messages)  # a chat request without tools: most of them
    parts: list[bytes] = []
    if (tools := doc.get("tools")) is not None:
        parts.append(_MESSAGE + b"tools" + _ROLE + _stable(tools))
    for field in ("system", "instructions"):
        if (value := doc.get(field)) is not None:
            parts.append(_MESSAGE + field.encode() + _ROLE + _content(value))
    if isinstance(messages, list):
        parts.append(_messages(messages))
    for field in ("prompt", "input"):
        if (value := doc.get(field)) is not None:
            parts.append(_content(value) if not isinstance(value, list) else _items(value))
    return b"".join(parts)


def _messages(messages: list[Any]) -> bytes:
    """Each message's role and content. This runs for every request, so the common
    conversation, every message a role and a text, is joined as text in one call and encoded
    once (no loop in Python; a role or content that is not text makes the join refuse);
    another is rendered message by message, the common ones as text."""
    count = len(messages)
    try:
        if sum(map(len, messages)) == 2 * count:  # each has both keys (else KeyError): no more
            parts = ["\x1e", "", "\x1f", ""] * count
            parts[1::4] = [m["role"] for m in messages]
            parts[3::4] = [m["content"] for m in messages]
            return "".join(parts).encode()
    except (KeyError, TypeError):  # a key missing, not a map, not text: rendered below
        pass
    texts: list[str] = []
    add = texts.append
    for message in messages:
        if type(message) is dict and len(message) == 2:
            role, content = message.get("role"), message.get("content")
            if type(role) is str and type(content) is str:
                add(f"\x1e{role}\x1f{content}")
                continue
        rest = messages[len(texts) :]
        return "".join(texts).encode() + b"".join(_message(m) for m in rest)
    return "".join(texts).encode()


def _message(message: Any) -> bytes:
    if not isinstance(message, dict):
        return _MESSAGE + _stable(message)
    role = message.get("role")
    head = _MESSAGE + (role.encode() if isinstance(role, str) else b"") + _ROLE
    if len(message) <= 2:  # role and content: most messages
        return head + _content(message.get("content"))
    rest = {k: v for k, v in message.items() if k not in ("role", "content")}
    return head + _content(message.get("content")) + (_stable(rest) if rest else b"")


def _items(values: list[Any]) -> bytes:
    """A list prompt: token ids, strings, or Responses API input items."""
    if all(isinstance(v, int) for v in values):
        return b"".join(v.to_bytes(4, "little", signed=True) for v in values)
    return b"".join(_message(v) if isinstance(v, dict) else _content(v) for v in values)


def _content(content: Any) -> bytes:
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, list):
        return b"".join(
            part["text"].encode()
            if isinstance(part, dict) and isinstance(part.get("text"), str) and len(part) <= 2
            else _stable(part)
            for part in content
        )
    return b"" if content is None else _stable(content)


def _stable(value: Any) -> bytes:
    """Key order does not change the rendering; what orjson cannot encode is left out."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return b""
