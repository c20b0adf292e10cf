"""Limits shared by every gateway replica (and worker) that names the same Redis.

One round trip per admit: a Lua script refills the key's bucket, checks its requests in
flight across every live gateway instance and counts this one in, atomically
(``gateway.limits.redis_scripts``). A release is sent off the request's path (a task of its
own). Each gateway process is an instance with a random id; its in-flight counts are a field
of its own in each key's hash, and a heartbeat says it lives, so a gateway that dies holds
no slot for longer than ``LIVE`` seconds.

When Redis cannot be reached (refused, or no answer within `timeout`), the `on_error` policy
decides every limited request at once, without asking again (``gateway.limits.outage``); the
heartbeat tries every ``RETRY`` seconds and, once Redis answers, writes this instance's
counts again (others may have dropped them meanwhile) before requests ask it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
from collections.abc import Awaitable
from typing import Any

from prometheus_client.registry import Collector
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway import waits
from gateway.errors import LimitsUnavailable
from gateway.keys import ApiKey
from gateway.limits import redis_scripts as lua
from gateway.limits.outage import Outage, OutageCollector
from gateway.limits.redis_batch import FAILURES, Batches, Script
from gateway.limits.settings import LimitsStoreSettings
from gateway.limits.store import LimitsStore, over_concurrency, over_rate

LIVE = 10.0  # seconds of silence after which an instance's slots are dropped
BEAT = 2.0  # seconds between heartbeats while Redis answers
RETRY = 0.5  # ... and while it does not
FORGET = 600.0  # seconds after which a silent instance leaves the instances set
CONNECTIONS = 128  # to Redis, per gateway process: admits and releases under way at once
ADMIT, RELEASE = Script(lua.ADMIT), Script(lua.RELEASE)


class RedisLimits(LimitsStore):
    remote = True

    def __init__(self, settings: LimitsStoreSettings, instance: str | None = None) -> None:
        assert settings.url is not None
        self.settings = settings
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.outage = Outage(settings.url, settings.on_error)
        self._instances = f"{settings.prefix}:instances"
        self._names: dict[str, tuple[str, str]] = {}  # key name -> (bucket, flight)
        self._held: dict[str, int] = {}  # flight hash -> slots this instance holds there
        self._client: Redis | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        password = self.settings.password
        timeout = self.settings.timeout
        # Requests beyond CONNECTIONS at once wait for a free connection (within `timeout`),
        # rather than fail as redis-py's default pool makes them beyond its 100.
        pool = BlockingConnectionPool.from_url(
            self.settings.url or "",
            max_connections=CONNECTIONS,
            timeout=timeout,
            password=password.get_secret_value() if password is not None else None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            client_name="vllm-gateway",
            retry=Retry(NoBackoff(), 0),  # no retry: the policy decides at once
        )
        self._client = Redis(connection_pool=pool)
        self._batches = Batches(self._client)
        self._heartbeat = self._client.register_script(lua.HEARTBEAT)
        self._reassert = self._client.register_script(lua.REASSERT)
        await self.beat()
        self._beat = asyncio.create_task(self._beating(), name="limits-store-heartbeat")

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
        if self._client is not None:
            await self.flushed()
            if not self.outage.down:  # gone: others drop this instance's slots at once
                await self._call(self._client.zrem(self._instances, self.instance))
            await self._client.aclose()
            await self._client.connection_pool.disconnect()

    def admit(self, key: ApiKey) -> bool:
        raise TypeError("the Redis store is asked across the network: await ask(key)")

    async def ask(self, key: ApiKey) -> bool:
        if self.outage.down:
            return self._decide(key)
        bucket, flight = self._keys(key)
        limits = (key.requests_per_minute or 0, key.max_concurrent or 0)
        args: list[str | int | float] = [*limits, self.instance, LIVE]
        pending = self._batches.call(ADMIT, [bucket, flight, self._instances], args)
        try:
            answer = await asyncio.shield(pending)
        except asyncio.CancelledError:  # the request is gone; a slot it got goes back
            pending.add_done_callback(lambda done: self._orphaned(done, flight))
            raise
        except FAILURES as error:
            self.outage.failed(error)
            return self._decide(key)
        if answer[0] == 1:
            self._held[flight] = self._held.get(flight, 0) + 1
            return True
        if answer[0] == 2:
            return False
        if answer[1] == b"busy":
            raise over_concurrency(key)
        raise over_rate(key, float(answer[1]))

    def release(self, key: ApiKey) -> None:
        flight = self._keys(key)[1]
        held = self._held.get(flight, 0)
        if held <= 0:
            return
        if held == 1:
            del self._held[flight]
        else:
            self._held[flight] = held - 1
        if not self.outage.down:  # else written again, whole, once Redis answers
            self._send_release(flight)

    async def flushed(self) -> None:
        """Until what was sent (releases among it) has been answered."""
        await self._batches.drain(timeout=self.settings.timeout * 4)

    def held(self, key: ApiKey) -> int:
        """Slots this instance holds for ``key``."""
        return self._held.get(self._keys(key)[1], 0)

    def collector(self) -> Collector:
        return OutageCollector(self.outage)

    async def beat(self) -> None:
        """Say this instance lives; after an outage, write its counts again first."""
        was_down = self.outage.down
        beat = self._heartbeat(keys=[self._instances], args=[self.instance, FORGET])
        if not await self._call(beat):
            return
        if was_down and self._held:
            flights = list(self._held)
            counts = [self._held.get(f, 0) for f in flights]
            if not await self._call(self._reassert(keys=flights, args=[self.instance, *counts])):
                return
        self.outage.answered()

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(RETRY if self.outage.down else BEAT)
            await self.beat()

    def _send_release(self, flight: str) -> None:
        """Off the request's path: its batch leaves with the loop's next turn."""
        self._batches.call(RELEASE, [flight], [self.instance]).add_done_callback(self._sent)

    def _sent(self, release: asyncio.Future[Any]) -> None:
        if not release.cancelled() and (error := release.exception()) is not None:
            if not isinstance(error, FAILURES):
                raise error  # a bug: to the loop's exception handler, which logs it
            self.outage.failed(error)  # this instance's counts are written again when back

    def _orphaned(self, admit: asyncio.Future[Any], flight: str) -> None:
        """An admit whose request was cancelled while Redis answered it."""
        if admit.cancelled() or admit.exception() is not None:
            return
        if admit.result()[0] == 1:
            self._send_release(flight)

    async def _call(self, call: Awaitable[Any]) -> bool:
        """Whether Redis answered; a failure marks the outage."""
        try:
            await call
        except FAILURES as error:
            self.outage.failed(error)
            return False
        return True

    def _decide(self, key: ApiKey) -> bool:
        """Redis is down: the policy says (fail_open: through, uncounted)."""
        self.outage.decided += 1
        if self.settings.on_error == "fail_closed":
            raise LimitsUnavailable(
                f"Key {key.name!r} has limits, and the store they are counted in cannot be "
                "reached; retry shortly.",
                retry_after=waits.RETRY_LIMITS_STORE,
            )
        return False

    def _keys(self, key: ApiKey) -> tuple[str, str]:
        names = self._names.get(key.name)
        if names is None:
            digest = hashlib.sha256(key.name.encode()).hexdigest()[:32]
            base = f"{self.settings.prefix}:{digest}"
            names = self._names[key.name] = (f"{base}:bucket", f"{base}:flight")
        return names
