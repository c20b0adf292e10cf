"""One request's way along its model's fallbacks: whether a failure moves it on, and where.

The relay asks ``move(reason)`` when its model cannot answer, before anything was sent to the
client; the walk picks the next name of the chain (``gateway.traffic.fallback_plan``) that
the route table still has, that the key may call (its allow-list holds: a name outside it is
passed over as if it did not exist), that was not tried yet and, after a context-length
refusal, whose max-model-len is larger than the prompt needs. Each move is counted.
"""

from __future__ import annotations

from backends.pool import ReplicaPool
from gateway.catalog import learn_max_model_len
from gateway.errors import ModelNotFound
from gateway.job import Job, reroute
from gateway.record import FallbackMove, RequestRecord
from gateway.routing import Route, RouteTable
from gateway.traffic import reasons
from gateway.traffic.plan import Fallbacks
from gateway.traffic.reasons import ContextRefusal
from gateway.traffic.settings import FallbackReason
from gateway.types import Scope
from gateway.upstream import UpstreamResponse, Upstreams

ERROR_BODY_BYTES = 64 * 1024  # an error body read whole is no larger (vLLM's are small)


class FallbackWalk:
    """Made per request, only for a model (or adapter) with fallbacks."""

    __slots__ = ("_allowed", "_content_type", "_scope", "_table", "_upstreams", "fallbacks",
                 "job", "needs", "tried")  # fmt: skip

    def __init__(
        self,
        fallbacks: Fallbacks,
        job: Job,
        table: RouteTable,
        allowed: frozenset[str] | None,
        upstreams: Upstreams,
        scope: Scope,
        content_type: str,
    ) -> None:
        """``allowed``: the key's models (None: all); ``job``: the request as first routed."""
        self.fallbacks = fallbacks
        self.job = job  # the model being tried now
        self.tried = {job.model}
        self.needs = 0  # tokens a fallback must hold more than (after a context refusal)
        self._table = table
        self._allowed = allowed
        self._upstreams = upstreams
        self._scope = scope
        self._content_type = content_type

    def reads_whole(self, status: int) -> bool:
        """Whether an answer with this status is read whole before its head goes out: a 400
        may be a context-length refusal, told by its message."""
        return status == reasons.CONTEXT_STATUS and "context_length" in self.fallbacks.on

    async def refused(self, status: int, first: bytes, record: RequestRecord) -> bool:
        """Whether the backend's answer is one to take elsewhere, and the walk moved on: vLLM
        overloaded (429, 503), or refusing a prompt longer than its context (``first``: the
        whole body of that 400)."""
        if status == reasons.CONTEXT_STATUS:
            refusal = reasons.context_refusal(first) if self.reads_whole(status) else None
            return refusal is not None and await self.move("context_length", record, refusal)
        return await self.move(reasons.of_status(status), record)

    async def move(
        self,
        reason: FallbackReason | None,
        record: RequestRecord,
        refusal: ContextRefusal | None = None,
        *,
        ready: bool = False,
    ) -> bool:
        """Move on to the next model for ``reason``, if there is one; False otherwise.
        ``ready``: only to a model that would take the request at once."""
        if reason is None or reason not in self.fallbacks.on:
            return False
        if refusal is not None:
            self.needs = max(self.needs, refusal.needs)
        found = await self._next(ready)
        if found is None:
            return False
        move = FallbackMove(self.job.model, found.name, reason)
        record.fallbacks = [*(record.fallbacks or ()), move]
        if record.trace is not None:  # [trace: the request moves to another model]
            record.trace.fell_back(move)
        self.job = reroute(self.job, found, self._scope, self._content_type)
        return True

    async def _next(self, ready: bool) -> Route | None:
        for name in self.fallbacks.chain:
            try:
                found = self._table.resolve(name, self._allowed)
            except ModelNotFound:
                continue  # gone in a reload, or not this key's to call
            if found.name in self.tried:
                continue
            if ready and not serves_now(found):
                continue
            if self.needs and not await self._holds(found.pool):
                continue
            self.tried.add(found.name)
            return found
        return None

    async def _holds(self, pool: ReplicaPool) -> bool:
        """Whether the model's context holds the prompt (asked of it once, if not known)."""
        if pool.max_model_len is None:
            await learn_max_model_len(self._upstreams, pool)
        return pool.max_model_len is not None and pool.max_model_len > self.needs


def serves_now(found: Route) -> bool:
    """Whether a request for this route would be sent at once, without waiting for a start,
    a wake or a restart."""
    pool = found.pool
    if pool.on_demand is not None and not pool.on_demand.serving:
        return False
    return pool.ready_for(found.adapter)


async def read_whole(response: UpstreamResponse, first: bytes) -> bytes:
    """A small body read to its end, or to ``ERROR_BODY_BYTES``."""
    while len(first) < ERROR_BODY_BYTES and (chunk := await response.readany()):
        first += chunk
    return first
