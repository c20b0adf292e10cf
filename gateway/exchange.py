"""One request's exchange with a backend: the replica, the attempts, the lease and the answer.

The relay tells the request's story (``gateway.relay``); the exchange does its upstream half:

    exchange = Exchange(upstreams, job, scope, request_id, retry_after)
    response = await exchange.open()   # pick, lease, send; a replica refusing: the next one
    exchange.headers(start_wait)       # the response head the client gets
    with exchange.reading():           # the HTTP client's failures mid-body: gateway errors
        await response.readany()       # ... the body as it arrives (gateway.pump)
    exchange.close(completed)          # the lease back; the connection kept, or dropped

It owns, and nothing else does: the choice of replica (``ReplicaPool.pick``), retrying another
one when a replica could not be reached before it answered (so a request is never answered
twice), the request's ``Lease``, the headers in both directions, the translation of the HTTP
client's failures (gateway/h1/, or ``gateway.inprocess`` in tests) into gateway errors (known
ones only: ``gateway.upstream.KNOWN``), and the passive health check (a replica is noted
failed on a refusal or a 5xx, and ejected after enough in a row).

``open`` is the attempt loop, one method: each try is ``_attempt(replica)``, the choice is
``_choose(tried)``. Hooks that belong to one attempt (a tracing span, a routing key) go
there; one that belongs to the whole exchange goes around ``open``: a fallback to another
model is a new exchange, made by the relay (``Relay._answer``, ``gateway.traffic``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends.pool import Lease, Replica
from backends.queues import Slot
from gateway import waits
from gateway.errors import BackendLoading, BackendUnavailable, GatewayError
from gateway.job import Job
from gateway.record import UNROUTED
from gateway.types import Scope
from gateway.upstream import (
    KNOWN,
    UpstreamResponse,
    Upstreams,
    downstream_headers,
    target,
    translate,
    upstream_headers,
)

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

START_WAIT_HEADER = b"x-vllm-gateway-start-wait"  # seconds it waited for its model to start
MODEL_HEADER = b"x-vllm-gateway-model"  # the model that answered (a fallback's, maybe)
_EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """What clients are told when no replica can take the request (`retry_after`)."""

    loading: int = waits.RETRY_LOADING
    no_replica: int = waits.RETRY_NO_REPLICA


class Exchange:
    __slots__ = (
        "_connect",
        "_lease",
        "_retry_after",
        "_scope",
        "_upstreams",
        "job",
        "replica",
        "request_id",
        "response",
        "slot",
        "streams",
        "trace",
    )

    def __init__(
        self,
        upstreams: Upstreams,
        job: Job,
        scope: Scope,
        request_id: bytes,
        retry_after: RetryAfter,
        trace: RequestTrace | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        """``trace``: the request's spans, when tracing is on (``gateway.tracing``);
        ``connect_timeout``: the model's own, else the HTTP client's."""
        self._upstreams = upstreams
        self._connect = connect_timeout
        self.trace = trace
        self._scope = scope
        self._retry_after = retry_after
        self._lease: Lease | None = None
        self.job = job
        self.request_id = request_id
        self.replica: Replica | None = None
        self.response: UpstreamResponse | None = None
        self.streams = False  # the backend answered with an event stream
        self.slot: Slot | None = None  # its turn in the model's queue, given back at ``close``

    async def open(self) -> UpstreamResponse:
        """Send the request until a replica answers with a head; gateway errors otherwise.

        Only failures before any response (refused, reset before the head) move on to the
        next replica; every replica is tried at most once.
        """
        tried: list[Replica] = []
        while True:
            replica = self._choose(tried)
            try:
                response = await self._attempt(replica)
            except BackendUnavailable as error:
                self._give_back()
                replica.note_failure()
                tried.append(replica)
                if len(tried) >= len(self.job.pool.replicas):
                    raise
                if self.trace is not None:  # [trace: this attempt is retried]
                    self.trace.attempt_failed(error)
                continue
            if response.status >= 500:
                replica.note_failure()
            else:
                replica.note_success()
            if self.trace is not None:  # [trace: the backend's head]
                self.trace.answered(response.status)
            self.response = response
            self.streams = response.content_type == _EVENT_STREAM
            if self.streams:
                self._lease.stream()  # type: ignore[union-attr]
            return response

    def _choose(self, tried: list[Replica]) -> Replica:
        """A ready replica not tried yet, by the pool's policy; 503 when there is none."""
        job = self.job
        pool = job.pool
        replica = pool.pick(tried, job.affinity, job.adapter, job.prompt)
        if replica is not None:
            return replica
        if pool.loading:
            raise BackendLoading(
                f"Model {pool.name!r} is loading; retry in a few seconds.",
                retry_after=self._retry_after.loading,
            )
        raise BackendUnavailable(
            f"No backend of model {pool.name!r} is available.",
            retry_after=self._retry_after.no_replica,
        )

    async def _attempt(self, replica: Replica) -> UpstreamResponse:
        """One try on one replica: the lease is taken first, and held until ``close``."""
        self.replica = replica
        self._lease = replica.lease(self.job.pool)
        scope = self._scope
        # [trace: an attempt's span; the backend's traceparent names it]
        traced = self.trace.start_attempt(replica) if self.trace is not None else None
        request_id = self.request_id.decode()
        headers = upstream_headers(scope["headers"], replica.api_key, request_id, traced)
        path = target(scope["path"], scope["query_string"])
        try:
            pool = self._upstreams.pool(replica.url, replica.uds, self._connect)
            return await pool.request("POST", path, headers, self.job.body)
        except KNOWN as exc:
            raise translate(exc, self.job.pool.name) from None

    @property
    def backend(self) -> str:
        """The URL of the replica tried last: the one that answered, once ``open`` returned."""
        return self.replica.url if self.replica is not None else UNROUTED

    def reading(self) -> Exchange:
        """Around the body's relay (``with exchange.reading():``): the HTTP client's failures
        mid-body become gateway errors. One block for the whole body, not a call per chunk:
        the loop inside is the hot path (and a class's ``__exit__``, not a generator's)."""
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, KNOWN):
            raise translate(exc, self.job.pool.name, started=True) from None

    def headers(self, start_wait: float | None) -> list[tuple[bytes, bytes]]:
        """The head the client gets: the backend's end-to-end headers, the request id and
        the model that answered."""
        headers = downstream_headers(self.response, self.request_id)  # type: ignore[arg-type]
        headers.append((MODEL_HEADER, self.job.model.encode("latin-1", "replace")))
        if start_wait is not None:
            headers.append((START_WAIT_HEADER, b"%.3f" % start_wait))
        return headers

    def timed_out(self, started: bool) -> GatewayError:
        """The error for a backend silent past its deadline (the relay's clock)."""
        return translate(TimeoutError(), self.job.pool.name, started=started)

    def close(self, completed: bool) -> None:
        """The end, whichever way it came: the lease back, and the connection kept when the
        body was read whole; dropped otherwise, which is how vLLM learns to abort."""
        self._give_back()
        if self.slot is not None:  # with the lease: the next in the model's queue goes
            self.slot.release()
            self.slot = None
        response, self.response = self.response, None
        if response is not None:
            response.release() if completed else response.close()

    def _give_back(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
