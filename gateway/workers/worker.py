"""One worker process: it relays requests on the shared port, by the control plane's states.

What a worker holds: the mirror of the models and replicas (``gateway.workers.mirror``), the
relay with its HTTP client pools and per-key limiter (``gateway.workers.limits``), access
(keys, watched in the keys file as one gateway does), CORS, its telemetry (counted here,
summed by the control plane), and the channel to the control plane. What it does not: spawn,
health-check, start, sleep or stop anything; every path it does not relay goes to the control
plane (``gateway.workers.forward``).

Its lifespan connects to the control plane and waits for the first document before uvicorn
listens, so no connection reaches a worker that knows no model. When the channel closes (the
control plane stopped, or died), the worker stops as a gateway does: the requests it relays
finish; new connections go to none.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gateway.auth import AccessMiddleware, access_policy
from gateway.boundary import ErrorBoundary
from gateway.config_file import ConfigError, load_settings
from gateway.dispatch import Dispatcher
from gateway.keys import key_ring
from gateway.relay import Relay
from gateway.runtime import Front, access_log, relay_limits
from gateway.settings import GatewaySettings
from gateway.telemetry import Telemetry
from gateway.types import Receive, Scope, Send
from gateway.upstream import UpstreamClients
from gateway.workers.channel import Channel, Message, connect, log_failure
from gateway.workers.counters import InFlightTable
from gateway.workers.forward import Forward
from gateway.workers.limits import worker_key_limiter
from gateway.workers.mirror import Mirror
from gateway.workers.shares import share

log = logging.getLogger("vllm_gateway.workers")
FIRST_DOCUMENT_TIMEOUT = 60.0  # seconds a new worker waits for the control plane's table


class ControlPlaneGone(Exception):
    """A worker cannot start: its control plane never sent the table it routes by."""


class Worker:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        row: int,
        table: InFlightTable | None,
        private_dir: Path,
        generation: int,
        overrides: Mapping[str, Any],
        limits_table: str | None = None,
    ) -> None:
        """``private_dir``: the control plane's sockets and config files; ``generation``:
        the config's, which ``settings`` were read from (with the command line's
        ``overrides``; both are read again when the control plane reloads);
        ``limits_table``: where the host's per-key limits table is (``SharedTable.where``;
        None: none, with Redis or in a test)."""
        self.settings = settings
        self.row = row
        self.private_dir = private_dir
        self.generation = generation
        self.overrides = dict(overrides)
        self.channel: Channel | None = None
        self.mirror = Mirror(table, row, self._tell, self._ask)
        self.clients = UpstreamClients(connect_timeout=settings.timeouts.connect)
        tracing = None
        if settings.tracing is not None:  # OpenTelemetry is imported only where it is used
            from gateway.tracing import Tracing

            tracing = Tracing(settings.tracing)
        self.telemetry = Telemetry(self.mirror.pools, access_log(settings), tracing)
        limiter = worker_key_limiter(settings, row, limits_table)
        limits = relay_limits(settings)
        self.relay = Relay(
            self.mirror.routes, self.clients, limits, self.telemetry, key_limits=limiter
        )
        self.keys = key_ring(settings)
        needs = access_policy(frozenset(settings.open_endpoints))
        refused = self.telemetry.refused
        self.access = AccessMiddleware(self.relay, self.keys, needs, on_refused=refused)
        self.front = Front(ErrorBoundary(self.access), settings)
        connect_timeout = settings.timeouts.connect
        self.forward = Forward(
            str(private_dir / "control.sock"), settings.max_body_bytes, connect_timeout
        )
        self.app = Dispatcher(self.front, ErrorBoundary(self.forward), self.lifespan)
        self.lost: Callable[[], None] = lambda: None  # the server's stop, once it runs
        self._first = asyncio.Event()
        self._run: asyncio.Task[None] | None = None
        self._keys_watch: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        path = str(self.private_dir / "workers.sock")
        self.channel = await connect(path, self._notice, self._answer)
        self._run = asyncio.create_task(self.channel.run(), name="workers:channel")
        self._run.add_done_callback(log_failure)  # a notice it could not apply: a bug, shown
        self._run.add_done_callback(lambda _: self._channel_closed())
        hello = {"t": "hello", "row": self.row, "pid": os.getpid(), "generation": self.generation}
        self.channel.tell(hello)
        await self._first_document(self._run)
        if self._keys_watch is None:  # else a reload at its hello started one already
            self._keys_watch = asyncio.create_task(self.keys.watch(), name="keys:watch")
        await self.relay.key_limits.start()  # Redis connects here; the host's table is mapped
        try:
            yield
        finally:
            self.mirror.demand.flush()  # what its last requests counted, while the line is up
            tasks = [t for t in (self._run, self._keys_watch) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.channel.close()
            self.forward.close()
            await self.relay.key_limits.close()
            await self.clients.aclose()
            self.telemetry.close()
            if (tracing := self.telemetry.tracing) is not None:
                await asyncio.to_thread(tracing.shutdown)

    async def _first_document(self, channel: asyncio.Task[None]) -> None:
        """Until the control plane's first table; a control plane that is gone before it
        sent one (killed while this worker started) ends the start at once."""
        first = asyncio.ensure_future(self._first.wait())
        try:
            await asyncio.wait(
                {first, channel},
                timeout=FIRST_DOCUMENT_TIMEOUT,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            first.cancel()
        if not self._first.is_set():
            why = (
                "closed its channel"
                if channel.done()
                else f"sent nothing in {FIRST_DOCUMENT_TIMEOUT:g}s"
            )
            raise ControlPlaneGone(
                f"worker {self.row}: the control plane {why} before its first table"
            )

    def _channel_closed(self) -> None:
        if self._first.is_set():
            log.info("worker %d: the control plane is gone; stopping", self.row)
            self.lost()

    # The channel's two halves.

    def _tell(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.tell(message)

    async def _ask(self, message: Message) -> Message:
        assert self.channel is not None  # requests come once the lifespan has connected
        return await self.channel.ask(message)

    def _notice(self, message: Message) -> None:
        kind = message["t"]
        if kind == "table":
            self.mirror.apply(message["doc"], message["g"])
            self.telemetry.models_changed()
            self._tell({"t": "applied", "g": message["g"]})
            self._first.set()
        elif kind == "settings":
            self.reload(message["generation"])

    async def _answer(self, message: Message) -> Message:
        if message["t"] == "up":  # a request's turn needs its model up (gateway.workers.turns)
            return await self.mirror.turns.bring_up(message["n"])
        if message["t"] == "ping":  # its loop turns: the control plane's liveness probe
            return {}
        if message["t"] != "share":
            raise ValueError(f"no such request: {message['t']!r}")
        return share(self.telemetry, self.mirror.pools)

    # A reload.

    def reload(self, generation: int) -> None:
        """The control plane applied a new config: what a worker holds of it, for new
        requests (keys, access, limits, CORS, the access log); models come with the next
        document. One that does not validate here (a keys file changed since) changes
        nothing."""
        try:
            path = self.private_dir / f"config-{generation}.json"
            new = load_settings(path, **self.overrides)
            keys = key_ring(new)
        except ConfigError as exc:
            log.error("worker %d: config not reloaded: %s", self.row, "; ".join(exc.problems))
            return
        if self._keys_watch is not None:
            self._keys_watch.cancel()
        self._keys_watch = asyncio.create_task(keys.watch(), name="keys:watch")
        self.keys = self.access.keys = keys
        self.access.needs = access_policy(frozenset(new.open_endpoints))
        self.relay.use_limits(relay_limits(new))
        self.telemetry.access_log = access_log(new)
        self.front.use(new)
        self.forward.max_body_bytes = new.max_body_bytes
        self.settings, self.generation = new, generation
