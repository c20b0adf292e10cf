"""A new gateway takes over the servers the last one left running, or ends them.

A recorded server (``backends.state_dir``) is adopted only when all of these hold, checked in
this order:

1. its command hash is the one the config gives now (else the model changed: start fresh);
2. its reaper is the same process: the recorded pid lives and has the recorded start time
   (a pid reused by another process is never signalled, let alone adopted);
3. its reaper accepts the adoption (``backends.reaper``): from then on it waits on this
   gateway, and it stops counting down ``keep_backends``;
4. it answers ``/health`` and lists its model on ``/v1/models`` with the recorded key.

An on-demand model's server is also asked ``/is_sleeping`` (vLLM's sleep mode): one that
sleeps is adopted asleep, and wakes on its model's next request as any asleep server does.

Anything else is refused (``Refused``, with the reason), and the caller ends what is left of
the recorded tree (``end_recorded``) before the model starts fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

import httpx

from backends.errors import SleepModeError
from backends.health import served
from backends.proctree import end_group, group_members, start_time
from backends.reaper import ADOPT, tell
from backends.sleep_mode import is_sleeping
from backends.state_dir import ServerRecord

CLAIM_TIMEOUT = 5.0  # for each of the server's answers
STOP_GRACE = 15.0  # a refused server's group: SIGTERM, then SIGKILL after this


class Refused(Exception):
    """This recorded server is not adopted; the message says why."""


@dataclass(frozen=True)
class Adopted:
    record: ServerRecord
    adapters: frozenset[str]  # the LoRA adapters it serves, as a fresh start's readiness finds
    asleep: bool = False  # an on-demand server in vLLM's sleep mode, asleep


def is_same_process(record: ServerRecord) -> bool:
    return start_time(record.pgid) == record.start_time


async def adopt(
    record: ServerRecord, name: str, command_hash: str, on_demand: bool = False
) -> Adopted:
    """Adopt the recorded server of model ``name`` if it passes every check; else Refused.
    ``on_demand``: ask whether it sleeps (a server without sleep mode's endpoints is awake)."""
    if record.command_hash != command_hash:
        raise Refused("it was started with another command or environment")
    if not is_same_process(record):
        raise Refused(f"its reaper (pid {record.pgid}) is gone or the pid is another process's")
    await claim(record)
    transport = httpx.AsyncHTTPTransport(uds=record.uds) if record.uds else None
    async with httpx.AsyncClient(timeout=CLAIM_TIMEOUT, transport=transport) as client:
        adapters = await served(client, record.url, name, record.api_key)
        if adapters is None:
            raise Refused("it does not answer /health, or does not list the model with its key")
        asleep = on_demand and await _sleeps(client, record)
    return Adopted(record, adapters, asleep)


async def _sleeps(client: httpx.AsyncClient, record: ServerRecord) -> bool:
    try:
        return await is_sleeping(client, record.url)
    except SleepModeError:  # started without sleep mode (`unload: stop`): no such endpoint
        return False


async def claim(record: ServerRecord) -> None:
    """Become the reaper's owner; Refused if it does not say ``ok`` in time."""
    try:
        await asyncio.to_thread(tell, record.pgid, record.start_time, ADOPT)
    except OSError as exc:
        raise Refused(f"its reaper did not accept the adoption ({exc})") from exc


async def end_recorded(record: ServerRecord, grace: float = STOP_GRACE) -> bool:
    """End what lives of a recorded server's tree, as a whole.

    While the reaper is the recorded process, its group is ended (it may be another gateway's
    still: the config no longer wants it here). If the reaper is gone, so is its pid's reuse
    worry for the group: Linux does not hand out a pid while a group of that id has members,
    so members found under the recorded id are the old tree's (an engine core whose reaper and
    API server were killed) and are ended. If the pid lives as another process, nothing of
    the old tree can be left, and that process is not touched. True if anything was ended.
    """
    live = start_time(record.pgid)
    found = (live is None or live == record.start_time) and bool(group_members(record.pgid))
    if found:
        await asyncio.to_thread(end_group, record.pgid, grace)
    if record.uds is not None:
        with contextlib.suppress(OSError):
            os.unlink(record.uds)  # the socket file outlives its server
    return found
