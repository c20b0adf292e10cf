"""A relayed request once routed: which pool serves it, and the exact bytes that go there.

The body is read once; its `model` (a JSON field, or a multipart form field) picks the route.
The bytes are passed on as the client sent them, re-encoded only when they must change: an
alias becomes the canonical name (the backend knows no other), a stream is asked to report
its token usage (``stream_usage: always``, ``gateway.usage``), or the request falls back to
another model (``reroute``: the backend checks the name it is sent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from backends.pool import ReplicaPool
from backends.prompt_blocks import PromptBlocks
from gateway.peek import model_from_json, model_from_multipart
from gateway.prompt_prefix import prompt_hashes
from gateway.routing import MULTIPART_PATHS, Route, RouteTable
from gateway.types import Scope
from gateway.usage import UsageStripper, ask_for_usage


@dataclass(frozen=True, slots=True)
class Job:
    pool: ReplicaPool
    body: bytes
    model: str  # the name it is counted under: an adapter's, or the pool's model
    stripper: UsageStripper | None  # set when the gateway asked for usage on the client's behalf
    affinity: str | None = None  # the session key, for pools balanced by affinity
    adapter: str | None = None  # a LoRA adapter: only the replicas that hold it
    asked: str = ""  # the name the client sent (an alias, say), for its trace
    prompt: PromptBlocks | None = None  # its prompt's block hashes, for balance: prefix
    doc: dict[str, Any] | None = None  # the JSON body as sent (None: a multipart form)


def route(
    scope: Scope,
    body: bytes,
    content_type: str,
    table: RouteTable,
    allowed: frozenset[str] | None,
    usage_for_all_streams: bool,
) -> Job:
    """The job for a request body; gateway errors for a body or a model that will not do."""
    path = scope["path"]
    if path in MULTIPART_PATHS:
        model, value = model_from_multipart(body, content_type)
        found = table.resolve(model, allowed)
        pool = found.pool
        if found.via_alias:
            body = body[: value.start] + pool.name.encode() + body[value.stop :]
        affinity = _affinity(pool, {}, scope)
        return Job(pool, body, found.name, None, affinity, found.adapter, asked=model)
    model, doc = model_from_json(body, content_type)
    found = table.resolve(model, allowed)
    pool = found.pool
    with_usage = ask_for_usage(path, doc) if usage_for_all_streams else None
    if with_usage is not None or found.via_alias:
        doc = {**(with_usage or doc), "model": pool.name}
        body = orjson.dumps(doc)
    stripper = UsageStripper() if with_usage is not None else None
    affinity = _affinity(pool, doc, scope)
    prompt = prompt_hashes(pool, doc, found.adapter)
    return Job(pool, body, found.name, stripper, affinity, found.adapter, model, prompt, doc)


def reroute(job: Job, found: Route, scope: Scope, content_type: str) -> Job:
    """The same request for another model (a fallback): the body names that model now."""
    pool, name = found.pool, found.name
    if job.doc is None:
        _, value = model_from_multipart(job.body, content_type)
        body = job.body[: value.start] + name.encode() + job.body[value.stop :]
        return Job(pool, body, name, None, _affinity(pool, {}, scope), found.adapter, job.asked)
    doc = {**job.doc, "model": name}
    affinity = _affinity(pool, doc, scope)
    prompt = prompt_hashes(pool, doc, found.adapter)
    stripper = UsageStripper() if job.stripper is not None else None
    return Job(
        pool, orjson.dumps(doc), name, stripper, affinity, found.adapter, job.asked, prompt, doc
    )


def _affinity(pool: ReplicaPool, doc: dict[str, Any], scope: Scope) -> str | None:
    """The session key: OpenAI's `user` field, else the pool's affinity header."""
    if pool.policy != "affinity":
        return None
    user = doc.get("user")
    if isinstance(user, str) and user:
        return user
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    return next((v.decode("latin-1") for k, v in headers if k == pool.affinity_header), None)
