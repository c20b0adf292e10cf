"""The control plane's side of its workers: states pushed out, starts and counts taken in.

The control plane runs the gateway as one process does (the supervisor, health checks,
on-demand starts and sleeps, the swap books, reload, the admin API); its workers relay. This
is what it does for them, over one channel each (``gateway.workers.channel``):

- **push**: the routes and every replica's state (``gateway.workers.snapshot``), sent when
  a model's life moves (its ``changed`` signal), when a reload was applied, and otherwise
  when a look once a second finds the document changed (vLLM's load figures, adapters);
  only a document that differs from the last one sent goes out;
- **settle**: a drain waits until every worker has applied the latest document
  (``ModelLife.settle``), so that a request a worker sent before it saw a replica leave is
  counted by the drain, not cut by the stop that follows it;
- **starts**: a worker's ``ready`` request runs the on-demand model's ``ready()`` here,
  where its queue, backoff and swaps are; the model's new state goes out before the answer;
- **turns**: a worker's ``turn`` request waits in the model's queue here, the one queue of
  the whole gateway (``gateway.workers.turn_book``); the slot it gets is held until the
  worker says ``done``, or its channel closes;
- **demand**: a worker tells, in batches, the requests that found an on-demand model serving
  and the requests each served (``gateway.workers.demand``); they are counted as this
  process's own, for the swap scheduler and the service rates of `/admin/models`;
- **in flight**: a worker tells when its count on a replica goes from zero to some or back
  (``busy``, ``idle``); the replica's count here becomes the shared table's sum (its one
  writer in this process), and its ``went_idle`` fires at zero, as a lease's release would;
- **config**: each generation of the config in force is written once to the private
  directory (``config_file``), which workers read at their start and when told to reload;
  a worker that started with an older one than is in force by its hello is told at once;
- **shares**: before /metrics or /status.json, each worker's counts (``gateway.workers.
  shares``); a worker that died leaves its last share, and its row of the table is zeroed;
- **limits**: a worker that died gives back the `max_concurrent` slots its requests held in
  the host's limits table (its column zeroed, before its successor starts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from backends import clock
from backends.errors import Unavailable
from backends.on_demand import OnDemandModel, policy_of
from backends.pool import Replica
from backends.signals import Signal
from gateway.limits.shared import SharedTable
from gateway.runtime import Runtime
from gateway.workers.channel import LINE_LIMIT, Channel, ChannelClosed, Message, log_failure
from gateway.workers.counters import InFlightTable, SlotBook
from gateway.workers.demand import note
from gateway.workers.refusals import refusal
from gateway.workers.shares import Share, Totals
from gateway.workers.snapshot import table_document
from gateway.workers.turn_book import TurnBook

log = logging.getLogger("vllm_gateway.workers")
LOOK_EVERY = 1.0  # seconds between looks for changes that fire no signal
SETTLE_TIMEOUT = 2.0  # seconds a drain waits for a worker that does not confirm a document
SHARE_TIMEOUT = 2.0  # seconds a scrape waits for a worker's share (else its last one)


@dataclass(eq=False)
class Link:
    channel: Channel
    row: int = -1  # unknown until its hello
    pid: int = 0
    acked: int = 0  # the last document generation it applied


class Plane:
    def __init__(
        self,
        runtime: Runtime,
        table: InFlightTable,
        private_dir: Path,
        reloaded: Signal | None = None,
        generation: Callable[[], int] | None = None,
        limits: SharedTable | None = None,
    ) -> None:
        """``private_dir``: where the socket workers connect to is, and the config files they
        read; ``reloaded``: fires after a reload; ``generation``: the config generation in
        force (``Reloader.generation``); ``limits``: the per-key limits table the workers
        count in (None: they count in Redis)."""
        self.runtime = runtime
        self.table = table
        self.slots = SlotBook(table)
        self.private_dir = private_dir
        self.path = str(private_dir / "workers.sock")
        self.reloaded = reloaded
        self.config_generation = generation or (lambda: 1)
        self.limits = limits
        self.links: dict[int, Link] = {}  # by row, once they said hello
        self.last_shares: dict[int, Share] = {}  # by row
        self.totals = Totals()
        self.turns = TurnBook(lambda: self.runtime.pools, self.push)
        self.generation = 0  # of the document last sent
        self._sent = b""
        self._line = b""
        self._by_slot: dict[int, Replica] = {}
        self._acked = Signal()
        self._server: asyncio.Server | None = None
        self._look: asyncio.Task[None] | None = None
        self._config_seen = self.config_generation()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connected, self.path, limit=LINE_LIMIT)
        os.chmod(self.path, 0o600)
        self.runtime.telemetry.gather = self.gather
        self.push()
        self._look = asyncio.create_task(self._follow(), name="workers:push")
        self._look.add_done_callback(log_failure)

    async def stop(self) -> None:
        if self._look is not None:
            self._look.cancel()
            await asyncio.gather(self._look, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        for link in list(self.links.values()):
            link.channel.close()

    # Push.

    def push(self) -> None:
        """The document to every worker, if it changed since the last one sent."""
        runtime = self.runtime
        for life in runtime.lives.values():
            life.settle = self.settle
        self.slots.keep_only([r for pool in runtime.pools for r in pool.replicas])
        models = {m.name: m for m in runtime.settings.models}
        body = orjson.dumps(table_document(runtime.table.pools, models, self._slot))
        if body == self._sent:
            return
        self._sent, self.generation = body, self.generation + 1
        self._line = b'{"t":"table","g":%d,"doc":%s}\n' % (self.generation, body)
        for link in self.links.values():
            link.channel.send_line(self._line)

    def _slot(self, replica: Replica) -> int | None:
        slot = self.slots.slot(replica)
        if slot is not None:
            self._by_slot[slot] = replica
        return slot

    async def _follow(self) -> None:
        while True:
            waits = [life.changed.wait() for life in self.runtime.lives.values()]
            if self.reloaded is not None:
                waits.append(self.reloaded.wait())
            tasks = [asyncio.ensure_future(w) for w in waits]
            try:
                await asyncio.wait(tasks, timeout=LOOK_EVERY, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
            if self.config_generation() != self._config_seen:
                self._config_seen, _ = self.config_file()
                for link in self.links.values():  # before the routes it brings
                    link.channel.tell({"t": "settings", "generation": self._config_seen})
            self.push()

    def config_file(self) -> tuple[int, Path]:
        """The config in force and its generation, as workers read it: the mapping the control
        plane validated, written once per generation (never the user's file, which may have
        changed since without a reload)."""
        generation = self.config_generation()
        path = self.private_dir / f"config-{generation}.json"
        if not path.exists():
            part = path.with_suffix(".part")
            part.write_text(json.dumps(self.runtime.settings.raw, default=str))
            part.chmod(0o600)
            part.replace(path)
        return generation, path

    async def settle(self) -> None:
        """Until every worker has applied the latest document (or ``SETTLE_TIMEOUT``)."""
        self.push()
        target = self.generation
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                while any(link.acked < target for link in self.links.values()):
                    await self._acked.wait()
        except TimeoutError:
            late = [link.row for link in self.links.values() if link.acked < target]
            log.warning("workers %s did not confirm the new states in %gs", late, SETTLE_TIMEOUT)

    # The channel.

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = Channel(
            reader,
            writer,
            lambda m: self._notice(link, m),
            lambda m: self._answer(link, m),
            lambda m: self.turns.now(link, m) if m["t"] == "turn" else None,
        )
        link = Link(channel)
        try:
            await link.channel.run()
        finally:
            self.turns.drop(link)  # its requests ended with it: their turns go to the next
            if self.links.get(link.row) is link:
                del self.links[link.row]
            self._acked.fire()  # a settle waits for it no more

    def _notice(self, link: Link, message: Message) -> None:
        kind = message["t"]
        if kind == "busy" or kind == "idle":
            self._count(message["slot"])
        elif kind == "done":
            self.turns.done(link, message["n"])
        elif kind == "demand":
            for pool in self.runtime.pools:
                told, model = message["models"].get(pool.name), policy_of(pool)
                if told is not None and model is not None:  # else gone since (a reload)
                    note(model, told)
        elif kind == "want":
            if (model := self._on_demand(message["model"])) is not None:  # else a reload
                model.want()
        elif kind == "applied":
            link.acked = message["g"]
            self._acked.fire()
        elif kind == "hello":
            link.row, link.pid = message["row"], message["pid"]
            if (old := self.links.get(link.row)) is not None:
                old.channel.close()
            self.links[link.row] = link
            generation, _ = self.config_file()
            if message["generation"] != generation:  # a reload came while it started
                link.channel.tell({"t": "settings", "generation": generation})
            link.channel.send_line(self._line)
            log.info("worker %d (pid %d) connected", link.row, link.pid)

    def _count(self, slot: int) -> None:
        replica = self._by_slot.get(slot)
        if replica is None:
            return
        replica.in_flight = self.table.total(slot)
        if not replica.in_flight:
            replica.last_done = time.monotonic()
            replica.went_idle.fire()

    async def _answer(self, link: Link, message: Message) -> Message:
        if message["t"] == "turn":
            return await self.turns.turn(link, link.channel.ask, message)
        if message["t"] != "ready":
            raise ValueError(f"no such request: {message['t']!r}")
        model = self._on_demand(message["model"])
        try:
            left = message.get("left")
            deadline = None if left is None else clock.now() + left
            key, priority = message.get("key"), message.get("priority", 0)
            ready = model.ready(deadline, key=key, priority=priority) if model else None
            waited = await ready if ready is not None else 0.0
        except Unavailable as exc:
            return {"error": refusal(exc)}
        finally:
            self.push()  # the state the answer speaks of, before the answer
        return {"waited": waited}

    def _on_demand(self, name: str) -> OnDemandModel | None:
        """The on-demand model a worker names, if it is one still (a reload may drop it)."""
        pool = next((p for p in self.runtime.pools if p.name == name), None)
        return policy_of(pool) if pool is not None else None

    # Workers coming and going, and their counts.

    def worker_exited(self, row: int) -> None:
        """Its process is gone (never before: a live worker writes its row): its requests
        ended with it (their replicas' counts and their keys' slots), and what it counted last
        stays counted."""
        for slot in self.table.clear_row(row):
            self._count(slot)
        if self.limits is not None:
            self.limits.forget_worker(row)
        self.totals.retire(self.last_shares.pop(row, None))

    async def gather(self) -> None:
        """Every worker's share into the control plane's telemetry, and in-flight counts."""
        links = list(self.links.values())
        await asyncio.gather(*(self._share(link) for link in links))
        for slot, replica in self._by_slot.items():
            replica.in_flight = self.table.total(slot)
        shares = [self.last_shares[row] for row in sorted(self.last_shares)]
        pools = self.runtime.pools
        self.totals.apply(self.runtime.telemetry, pools, shares, self._by_slot.get)

    async def answers(self, row: int, timeout: float) -> bool:
        """Whether the worker of ``row`` answers a ping within ``timeout`` seconds: its event
        loop turns. True while it has not said hello (it is starting) or its line is down
        (it is ending: its exit is seen where its process is waited for)."""
        link = self.links.get(row)
        if link is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await link.channel.ask({"t": "ping"})
        except TimeoutError:
            return False
        except ChannelClosed:
            pass  # ending: its exit is seen where its process is waited for
        return True

    async def _share(self, link: Link) -> None:
        try:
            async with asyncio.timeout(SHARE_TIMEOUT):
                self.last_shares[link.row] = await link.channel.ask({"t": "share"})
        except (TimeoutError, ChannelClosed):
            pass  # its last share stands in
