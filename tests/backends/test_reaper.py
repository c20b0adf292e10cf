"""The reaper outlives its owner by `keep` seconds, takes a new owner who asks, and obeys only
its owner's release."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from backends.proctree import end_group, group_members, start_time
from backends.reaper import ADOPT, KEEP_ENV, RELEASE, tell
from tests.helpers import wait_until
from tests.servers import ROOT, alive, subprocess_env

pytestmark = pytest.mark.servers  # starts processes

# A stand-in gateway: starts a reaper over a sleeping "server", prints the reaper's pid, waits.
OWNER = """
import subprocess, sys, time
reaper = subprocess.Popen(
    [sys.executable, "-m", "backends.reaper", "--", sys.executable, "-c",
     "import time; time.sleep(600)"],
    start_new_session=True,
)
print(reaper.pid, flush=True)
time.sleep(600)
"""


def orphaned_reaper(keep: float) -> int:
    """A reaper whose owner was SIGKILLed: it waits ``keep`` seconds for a new one."""
    env = subprocess_env(**{KEEP_ENV: str(keep)})
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True
    )
    assert owner.stdout is not None
    pid = int(owner.stdout.readline())
    wait_until(lambda: len(group_members(pid)) == 2, 30, "the reaper and its server")
    owner.kill()
    owner.wait()
    return pid


@pytest.fixture
def reaper() -> Iterator[int]:
    pid = orphaned_reaper(keep=60)
    yield pid
    end_group(pid, 2)


def test_an_orphaned_reaper_waits_for_a_new_owner(reaper: int) -> None:
    assert alive(reaper) and len(group_members(reaper)) == 2


def test_a_new_owner_that_releases_it_starts_its_wait_and_it_ends_itself() -> None:
    pid = orphaned_reaper(keep=2)
    started = start_time(pid)
    assert started is not None
    tell(pid, started, ADOPT)
    tree = group_members(pid)
    tell(pid, started, RELEASE)
    wait_until(lambda: not any(alive(p) for p in tree), 30, "the tree to end itself")


def test_only_its_owner_may_release_it(reaper: int) -> None:
    started = start_time(reaper)
    assert started is not None
    tell(reaper, started, ADOPT)
    stranger = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from backends.reaper import *; tell({reaper}, {started}, RELEASE)",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert stranger.returncode != 0 and "answered b''" in stranger.stderr
    tell(reaper, started, RELEASE)  # its owner may


def test_a_stop_signal_ends_an_orphaned_reapers_whole_tree(reaper: int) -> None:
    tree = group_members(reaper)
    os.kill(reaper, signal.SIGTERM)
    wait_until(lambda: not any(alive(p) for p in tree), 30, "the tree to end")


def test_a_reaper_kept_for_no_time_ends_with_its_owner() -> None:
    pid = orphaned_reaper(keep=0)
    wait_until(lambda: not group_members(pid), 30, "the tree to end with its owner")
