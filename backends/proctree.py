"""The processes of one backend: one process group, led by the reaper, that nothing leaves.

vLLM's API server forks an engine core (and, with tensor parallelism, workers). None of them
changes its process group, so the group the gateway creates for the reaper holds the whole
tree. Its id is the reaper's pid, which the gateway knows, so the gateway can end every
process of the backend even after the reaper itself was killed (a ``pkill -9 -f MODEL`` hits
the reaper and the API server but not the engine core, which then lives on under init).

Linux only (/proc); elsewhere the group is still signalled, but members cannot be listed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in PROC.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_others(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal every member of the group but the calling process (the reaper, ending its tree)."""
    me = os.getpid()
    for pid in group_members(pgid):
        if pid != me:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def end_group(pgid: int, grace: float, tick: Callable[[], object] | None = None) -> bool:
    """SIGTERM every member but the caller, wait up to ``grace`` seconds for the group to
    empty (calling ``tick`` each round, e.g. to reap a child), then SIGKILL what is left.
    Blocking: the gateway runs it in a thread. True if nothing needed SIGKILL."""
    me = os.getpid()
    kill_others(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if not [pid for pid in group_members(pgid) if pid != me]:
            return True
        time.sleep(0.1)
    kill_others(pgid, signal.SIGKILL)
    if tick is not None:
        tick()
    return False


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc's field 22), or None if no such
    process lives. A pid and its start time name one process: a pid can be reused, the pair
    cannot (until the machine reboots, when every recorded server is gone anyway)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])  # field 22; fields[0] is field 3 (state)
