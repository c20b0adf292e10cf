"""One vLLM server process: start it under the reaper, end its whole tree, read its log.

Each server writes to its own log file, so a failing backend's last lines can be shown without
mixing four servers' output on the gateway's terminal. The reaper leads a process group that
holds the server and everything it forks (``backends.proctree``); ``stop`` ends that group
whatever state it is in, even when the reaper itself was killed. A server a previous gateway
started (``adopt``) is not this process's child: it is watched and signalled through a pidfd,
which names that one process however its pid is reused later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from backends.proctree import end_group, group_members, start_time
from backends.reaper import GRACE_ENV, KEEP_ENV, RELEASE, tell

# An engine core whose API server is gone has no request left to finish: a short grace.
LEFTOVER_GRACE = 2.0


# Ports this process handed out lately; see free_port.
_recent_ports: collections.deque[int] = collections.deque(maxlen=4096)
LOWEST_PORT = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a server to bind, below the kernel's ephemeral range where the range allows,
    free now, and never one this process handed out lately.

    A server binds its port seconds after it is given it. Meanwhile the kernel hands out its
    ephemeral ports to every outgoing connection and every bind to port 0, in this process and
    in others: a port taken from that range could be taken again before the server binds it,
    and the server would die with "address in use" while another answered in its place.
    """
    low = _ephemeral_low()
    while True:
        port = random.randrange(LOWEST_PORT, low) if low > LOWEST_PORT + 1000 else 0
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # in use: another try
            port = int(sock.getsockname()[1])
        if port not in _recent_ports:
            _recent_ports.append(port)
            return port


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # unknown: the kernel's choice (port 0)


class AdoptedProcess:
    """A reaper another gateway started, with the calls of ``asyncio.subprocess.Process``
    that ``BackendProcess`` makes. Its exit status is not ours to read: -1 once it ended."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)  # ProcessLookupError if it is gone already
        self.returncode: int | None = None
        self._ended = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self.returncode = -1
        self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        return -1

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class BackendProcess:
    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | AdoptedProcess | None = None
        self._log: IO[bytes] | None = None
        self.started_at = 0.0
        self._seen: set[int] = set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def start_time(self) -> int | None:
        """The reaper's start time (``proctree.start_time``), for the state directory."""
        return start_time(self._proc.pid) if self._proc is not None else None

    def _open_log(self, line: str) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log.write(f"\n=== {time.strftime('%F %T')} {line}\n".encode())
        self._log.flush()
        self.started_at = time.monotonic()
        self._seen = set()

    def adopt(self, pid: int) -> None:
        """Take over a reaper a previous gateway started (``backends.adoption`` checked it)."""
        self._open_log(f"adopted: reaper pid {pid}")
        self._proc = AdoptedProcess(pid)

    async def release(self) -> None:
        """Leave the server running for the next gateway to adopt (``keep_backends``): its
        reaper's wait starts now. A reaper that is gone or does not answer is left as it is:
        the next gateway ends what is left of it."""
        pid, started = self.pid, self.start_time
        if pid is not None and started is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(tell, pid, started, RELEASE)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def start(
        self, cmd: list[str], env: Mapping[str, str], stop_grace: float, keep: float = 0.0
    ) -> None:
        """``keep``: seconds the server waits for a new gateway once this one is gone. The
        command is logged as it is, so it must hold no secret (the key is in ``env``)."""
        self._open_log(f"starting: {' '.join(cmd)}")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backends.reaper",
            "--",
            *cmd,
            env={**env, GRACE_ENV: str(stop_grace), KEEP_ENV: str(keep)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            # A session and group of its own: Ctrl-C reaches the gateway, which stops backends
            # in order, and the group id (the reaper's pid) names the backend's whole tree.
            start_new_session=True,
            cwd=os.getcwd(),
        )

    async def wait(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    def tree(self) -> list[int]:
        """Every live process of this backend: reaper, server, engine core, workers. Each one
        seen is remembered until the next start, for the wait on its GPU memory."""
        members = group_members(self._proc.pid) if self._proc is not None else []
        self._seen.update(members)
        return members

    async def stop(self, grace: float) -> list[int]:
        """End the backend's whole tree; return the pids it had, for the GPU-memory wait.

        SIGTERM to the reaper, which stops the group in order. Whatever is left after that,
        or was left when the reaper died on its own (killed with the server, say), gets
        SIGTERM, then SIGKILL after LEFTOVER_GRACE: no process of the tree outlives this call.
        ``grace`` must be the one the process was started with (the reaper's own).
        """
        proc = self._proc
        if proc is None:
            return []
        self.tree()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace + 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.tree():  # the reaper is gone but part of its tree is not: nothing to drain
            await asyncio.to_thread(end_group, proc.pid, LEFTOVER_GRACE)
        if self._log is not None:
            self._log.close()
            self._log = None
        return sorted(self._seen)

    def tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 16384))
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]
