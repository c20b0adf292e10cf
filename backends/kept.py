"""The supervisor's side of a gateway restart that leaves the models running.

Every start of a server is recorded (``backends.state_dir``). With ``keep_backends``
seconds, a gateway that stops leaves its ready servers running; the next one adopts each
recorded server its config still wants as it is, and ends the rest (``backends.adoption``),
before any model starts. Without (0), every recorded server is ended: a gateway and a reaper
killed at the same moment leave a tree that the next start finds and ends. An on-demand
model's servers are kept while the model serves (adopted `ready`) or sleeps (adopted
`asleep`, at the level its record names); one caught mid-way (starting, draining, falling
asleep, waking) is not: its servers stop with the gateway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from backends import adoption
from backends.lifecycle import BackendState
from backends.pool import Replica
from backends.process import BackendProcess
from backends.spec import VllmSpec
from backends.state_dir import ServerRecord, StateDir, command_hash

log = logging.getLogger("vllm_gateway.supervisor")
S = BackendState


@dataclass(frozen=True)
class Resumed:
    """What an on-demand model's adopted servers do: serve, or sleep at ``level`` (0: no
    level was recorded; the model's own `sleep_level` then)."""

    asleep: bool
    level: int = 0


class KeptServers:
    def __init__(self, state_dir: StateDir | None, keep_backends: float, grace: float) -> None:
        self.state_dir = state_dir
        self.keep_backends = keep_backends if state_dir is not None else 0.0
        self.grace = grace  # for a recorded tree that is ended
        self._adopted: dict[str, adoption.Adopted] = {}  # label -> a server to take, not start
        self._records: dict[str, ServerRecord] = {}  # label -> its record as saved last

    def keeps(self, replica: Replica, alive: bool, model: BackendState) -> bool:
        """Leave this server running when the gateway stops: kept, alive, and serving in a
        serving model, or (on demand) asleep in a model that sleeps; not mid-way."""
        if self.keep_backends <= 0 or not alive:
            return False
        settled = (S.READY, S.ASLEEP)
        return replica.state is model and model in settled

    def has(self, label: str) -> bool:
        """An adopted server waits for this backend (an on-demand one's run starts now)."""
        return label in self._adopted

    def take(self, label: str) -> adoption.Adopted | None:
        """The adopted server of this backend, once: its first start takes it instead."""
        adopted = self._adopted.pop(label, None)
        if adopted is not None:
            self._records[label] = adopted.record
        return adopted

    def level(self, label: str) -> int:
        """The level its server fell asleep at, as recorded (0: awake, or not recorded)."""
        record = self._records.get(label)
        return 0 if record is None else record.asleep_level

    def slept(self, label: str, level: int) -> None:
        """The server fell asleep at ``level`` (0: it woke): a next gateway wakes it so."""
        record = self._records.get(label)
        if self.state_dir is None or record is None:
            return
        record = dataclasses.replace(record, asleep_level=level)
        self._records[label] = record
        self.state_dir.save(record)

    def record(self, spec: VllmSpec, replica: Replica, process: BackendProcess) -> None:
        pid, started = process.pid, process.start_time
        if self.state_dir is None or pid is None or started is None:
            return
        assert replica.api_key is not None
        port = None if replica.uds else int(replica.url.rsplit(":", 1)[1])
        record = ServerRecord(
            spec.label, pid, started, replica.api_key, spec_hash(spec), port=port, uds=replica.uds
        )
        self._records[spec.label] = record
        self.state_dir.lock()  # held already, unless this gateway spawned nothing until now
        self.state_dir.save(record)

    def close(self) -> None:
        if self.state_dir is not None:
            self.state_dir.unlock()

    def forget(self, label: str) -> None:
        self._records.pop(label, None)
        if self.state_dir is not None:
            self.state_dir.remove(label)

    async def sort(self, wanted: Mapping[str, tuple[VllmSpec, bool]]) -> None:
        """Before any start: adopt what the last gateway left that ``wanted`` (label -> spec,
        on-demand) still wants as it is; end the rest, each as a whole tree, so that no model
        runs twice."""
        if self.state_dir is None or not (wanted or self.state_dir.path.exists()):
            return
        self.state_dir.lock()
        records = self.state_dir.records()
        results = await asyncio.gather(*(self._try(r, wanted.get(r.label)) for r in records))
        refused = []
        for record, adopted in zip(records, results, strict=True):
            if adopted is not None:
                self._adopted[record.label] = adopted
            else:
                refused.append(record)
        # Together: the gateway serves (the adopted servers too) once the slowest has ended.
        await asyncio.gather(*(adoption.end_recorded(r, self.grace) for r in refused))
        for record in refused:
            self.state_dir.remove(record.label)
        if not wanted and not self._adopted:
            # It spawns nothing: the directory is not its to hold (another gateway started in
            # the same directory, connect mode too, may use it); a first spawn locks it again.
            self.state_dir.unlock()

    async def _try(
        self, record: ServerRecord, wanted: tuple[VllmSpec, bool] | None
    ) -> adoption.Adopted | None:
        if wanted is None or self.keep_backends <= 0:
            log.info("%s: ending the server the last gateway left: not kept here", record.label)
            return None
        spec, on_demand = wanted
        try:
            adopted = await adoption.adopt(record, spec.name, spec_hash(spec), on_demand)
        except adoption.Refused as refusal:
            log.warning("%s: not adopting the server left running: %s", record.label, refusal)
            return None
        asleep = " asleep" if adopted.asleep else ""
        log.info(
            "%s: adopting the server left running%s (pid %d)", record.label, asleep, record.pgid
        )
        return adopted


def spec_hash(spec: VllmSpec) -> str:
    """What a server of ``spec`` is started with, less its address and key."""
    command = spec.command(0, uds="UDS" if spec.unix_socket else None)
    return command_hash(command, spec.environment(base={}))
