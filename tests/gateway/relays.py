"""A relay in front of in-process backends (``gateway.inprocess``), inside the error boundary
as the app has it: the whole request path but the sockets."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from backends.pool import Ejection, Replica, ReplicaPool
from gateway.boundary import ErrorBoundary
from gateway.inprocess import Handler, InProcessUpstreams
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.limits.store import LimitsStore
from gateway.record import RequestRecord
from gateway.relay import Relay, RelayLimits
from gateway.routing import RouteTable
from gateway.telemetry import Telemetry
from tests.gateway.asgi import Call

MODEL = "m"


class Recording(Telemetry):
    """Telemetry that keeps each finished request's record."""

    def __init__(self, pools: list[ReplicaPool]) -> None:
        super().__init__(pools)
        self.records: list[RequestRecord] = []

    def finish(self, record: RequestRecord) -> None:
        self.records.append(record)
        super().finish(record)


class InProcessRelay:
    def __init__(
        self,
        backends: Mapping[str, Handler],
        *,
        ejection: Ejection | None = None,
        usage_for_all_streams: bool = False,
        key_limits: LimitsStore | None = None,
    ) -> None:
        """``backends``: URL -> handler, one replica of model ``m`` each, in that order."""
        self.replicas = [Replica(url=url, ejection=ejection or Ejection()) for url in backends]
        self.pool = ReplicaPool(MODEL, self.replicas)
        self.upstreams = InProcessUpstreams(backends)
        self.telemetry = Recording([self.pool])
        limits = RelayLimits(
            max_body_bytes=1 << 20,
            first_byte_timeout=60,
            idle_timeout=60,
            usage_for_all_streams=usage_for_all_streams,
        )
        table = RouteTable([(self.pool, [])])
        self.relay = Relay(table, self.upstreams, limits, self.telemetry, key_limits)
        self.app = ErrorBoundary(self.relay)

    def call(
        self, path: str = "/v1/chat/completions", key: ApiKey | None = None, **doc: object
    ) -> Call:
        """``key``: the caller's, as the access layer leaves it in the scope."""
        body = orjson.dumps({"model": MODEL, "messages": [], **doc})
        call = Call(self.app, path, body, [(b"x-request-id", b"req-1")])
        if key is not None:
            call.scope[SCOPE_KEY] = key
        return call

    @property
    def record(self) -> RequestRecord:
        """The last finished request's record."""
        return self.telemetry.records[-1]
