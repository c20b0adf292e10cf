"""A small parent for one vLLM server, so that no vLLM process outlives its backend.

Run as ``python -m backends.reaper -- CMD...``. It leads a process group of its own (the
gateway starts it in a new session) and starts CMD inside that group, so the server and every
process the server forks share one group whose id is the reaper's pid (``backends.proctree``).
When told to stop (SIGTERM or SIGINT), when the server exits, or when the gateway dies (the
kernel's parent-death signal, so even after a SIGKILL to the gateway), it ends the whole group:
SIGTERM, a grace period, then SIGKILL. If the reaper itself is killed, the gateway ends the
group by the same id.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

from backends.proctree import end_group

GRACE_ENV = "VLLM_GATEWAY_STOP_GRACE"
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def set_parent_death_signal(sig: int) -> None:
    """Linux only; elsewhere a no-op (the supervisor still stops the group on a clean exit)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def stop_group(server: subprocess.Popen[bytes], grace: float) -> None:
    """End every other process of this group; the server is reaped as it goes (a zombie would
    still count as a member)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # the group's SIGTERM reaches this process too
    end_group(os.getpgrp(), grace, tick=server.poll)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m backends.reaper -- CMD...", file=sys.stderr)
        return 2
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the gateway died before the signal was armed
        return 1
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # started without a session of its own: never end the caller's group
    grace = float(os.environ.pop(GRACE_ENV, "15"))

    def on_signal(signum: int, _: FrameType | None) -> None:
        raise _StopRequested(signum)  # leaves server.wait(), which holds the lock poll() needs

    server = subprocess.Popen(argv)  # a stop signal before the handlers: the gateway ends the group
    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        code = server.wait()
    except _StopRequested as stop:
        stop_group(server, grace)
        return 128 + stop.signum
    stop_group(server, 2.0)  # engine processes the server left behind
    return code


class _StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
