"""A small parent for one vLLM server, so that no vLLM process outlives the gateway.

Run as ``python -m backends.reaper -- CMD...``. It starts CMD in a process group of its own and,
when told to stop (SIGTERM or SIGINT), or when the gateway dies (the kernel's parent-death
signal, so even after a SIGKILL to the gateway), stops that whole group: SIGTERM, a grace
period, then SIGKILL. vLLM forks engine workers, so stopping the server alone is not enough.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

GRACE_ENV = "VLLM_GATEWAY_STOP_GRACE"
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> None:
    """Linux only; elsewhere a no-op (the supervisor still stops the group on a clean exit)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def stop_group(leader: subprocess.Popen[bytes], grace: float) -> None:
    """Stop the leader's process group; the leader is reaped as it goes (a zombie still counts
    as a member of its group)."""
    pgid = leader.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        leader.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


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
    grace = float(os.environ.pop(GRACE_ENV, "15"))
    child = subprocess.Popen(argv, start_new_session=True)

    def on_signal(signum: int, _: FrameType | None) -> None:
        raise _StopRequested(signum)  # leaves child.wait(), which holds the lock poll() needs

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        code = child.wait()
    except _StopRequested as stop:
        stop_group(child, grace)
        return 128 + stop.signum
    stop_group(child, 2.0)  # engine workers the server left behind
    return code


class _StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
