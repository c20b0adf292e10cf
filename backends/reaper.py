"""A small parent for one vLLM server, so that no vLLM process outlives its backend for long.

Run as ``python -m backends.reaper -- CMD...``. It leads a process group of its own (the
gateway starts it in a new session) and starts CMD inside that group, so the server and every
process the server forks share one group whose id is the reaper's pid (``backends.proctree``).
It ends the whole group (SIGTERM, a grace period, then SIGKILL) when told to stop (SIGTERM,
SIGINT or SIGHUP), when the server exits, or when its owner dies and nobody adopts it.

Its owner is the gateway that started it, then whichever gateway adopted it last. It watches
the owner through a pidfd, which becomes readable when that process ends however it ends
(SIGKILL included) and, unlike the parent-death signal, works for a process that is not its
parent. With ``keep`` seconds (``VLLM_GATEWAY_KEEP_BACKENDS``; 0 ends the group at once, as
before) an orphaned reaper waits that long for a new gateway to adopt it: the gateway connects
to the reaper's abstract unix socket, whose name is the reaper's pid and start time, and says
``adopt``; the kernel vouches for both sides (SO_PEERCRED: same user, the expected pid), the
reaper takes the caller as its new owner and answers ``ok``. No files to poll, no pid to trust
from a file, and the socket goes away with the reaper. A gateway that stops and leaves its
servers running says ``release`` the same way, so the wait starts then, not only once its
process is gone. If the reaper itself is killed, the gateway ends the group by its id.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from types import FrameType

from backends.proctree import end_group, start_time

GRACE_ENV = "VLLM_GATEWAY_STOP_GRACE"
KEEP_ENV = "VLLM_GATEWAY_KEEP_BACKENDS"
ADOPT, RELEASE, OK = b"adopt\n", b"release\n", b"ok\n"
TELL_TIMEOUT = 5.0  # seconds for a request to the reaper and its answer
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_UCRED = struct.Struct("3i")  # pid, uid, gid


def adoption_address(pid: int, started: int) -> str:
    """The reaper's abstract socket (Linux: a leading NUL, no file, gone when it exits)."""
    return f"\0vllm-gateway-reaper/{pid}/{started}"


def peer(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a unix socket, as the kernel says."""
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def tell(pid: int, started: int, request: bytes) -> None:
    """Send ``request`` (ADOPT or RELEASE) to the reaper ``pid`` that started at ``started``;
    OSError if it is gone, refuses, or is not who it should be. Blocking."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TELL_TIMEOUT)
        sock.connect(adoption_address(pid, started))
        if peer(sock)[0] != pid:
            raise ConnectionRefusedError(f"another process holds reaper {pid}'s address")
        sock.sendall(request)
        answer = sock.recv(len(OK))
    if answer != OK:
        raise ConnectionRefusedError(f"reaper {pid} answered {answer!r} to {request!r}")


def stop_group(server: subprocess.Popen[bytes], grace: float) -> None:
    """End every other process of this group; the server is reaped as it goes (a zombie would
    still count as a member)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # the group's SIGTERM reaches this process too
    end_group(os.getpgrp(), grace, tick=server.poll)


class Reaper:
    """The wait of one reaper: for the server's exit, a stop signal, its owner's end, an
    adoption, or the end of its wait for one."""

    def __init__(self, owner: int, owner_pid: int, keep: float) -> None:
        self.owner: int | None = owner  # a pidfd
        self.owner_pid = owner_pid  # only the owner may release the server
        self.keep = keep
        self.orphaned_at = 0.0
        self.stops: list[int] = []
        self.listener: socket.socket | None = None
        if keep > 0:
            started = start_time(os.getpid())
            assert started is not None  # this very process
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(adoption_address(os.getpid(), started))
            self.listener.listen(4)
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)  # a signal makes select return, whatever it waits on

    def on_signal(self, signum: int, _: FrameType | None) -> None:
        self.stops.append(signum)

    def run(self, server: subprocess.Popen[bytes], grace: float) -> int:
        exited = os.pidfd_open(server.pid)
        while True:
            watched = [exited, self.wakeup_r]
            watched += [fd for fd in (self.owner,) if fd is not None]
            listening = self.listener.fileno() if self.listener is not None else -1
            watched += [listening] if self.listener is not None else []
            timeout = None
            if self.owner is None:
                timeout = max(0.0, self.orphaned_at + self.keep - time.monotonic())
            ready, _, _ = select.select(watched, [], [], timeout)
            if self.wakeup_r in ready:
                os.read(self.wakeup_r, 512)
            if self.stops:
                stop_group(server, grace)
                return 128 + self.stops[0]
            if exited in ready:
                code = server.wait()
                stop_group(server, 2.0)  # engine processes the server left behind
                return code
            if self.listener is not None and listening in ready:
                self._answer(self.listener)
            elif self.owner is not None and self.owner in ready:
                self._release()  # the owner is gone
            if self.owner is None and time.monotonic() >= self.orphaned_at + self.keep:
                stop_group(server, grace)  # nobody came for it
                return 0

    def _answer(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TELL_TIMEOUT)
            pid, uid = peer(conn)
            if uid != os.getuid():
                return  # another user's process: it may not own this server
            with contextlib.suppress(OSError):
                request = conn.recv(16)
                if request == ADOPT and self._take(pid):
                    conn.sendall(OK)
                elif request == RELEASE and pid == self.owner_pid:
                    self._release()
                    conn.sendall(OK)

    def _take(self, pid: int) -> bool:
        try:
            owner = os.pidfd_open(pid)
        except ProcessLookupError:
            return False  # it gave up already
        self._release()
        self.owner, self.owner_pid = owner, pid
        return True

    def _release(self) -> None:
        if self.owner is not None:
            os.close(self.owner)
            self.owner, self.orphaned_at = None, time.monotonic()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m backends.reaper -- CMD...", file=sys.stderr)
        return 2
    parent = os.getppid()
    owner = os.pidfd_open(parent)
    if os.getppid() != parent:  # the gateway died before the pidfd was open: another process
        return 1
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # started without a session of its own: never end the caller's group
    grace = float(os.environ.pop(GRACE_ENV, "15"))
    reaper = Reaper(owner, parent, float(os.environ.pop(KEEP_ENV, "0")))
    server = subprocess.Popen(argv)  # a stop signal before the handlers: the gateway ends the group
    for sig in _STOP_SIGNALS:
        signal.signal(sig, reaper.on_signal)
    return reaper.run(server, grace)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
