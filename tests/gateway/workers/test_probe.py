"""The liveness probe of workers (``WorkerProcesses._watch``): a worker that misses its pings
``PROBE_MISSES`` times in a row is killed (and so started again); one that misses some but
answers in between is left alone, as is one that died meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.workers import processes
from gateway.workers.processes import PROBE_MISSES, WorkerProcesses


class Proc:
    """What the watch sees of a worker's process."""

    def __init__(self) -> None:
        self.pid, self.killed = 4242, 0
        self.returncode: int | None = None

    def kill(self) -> None:
        self.killed += 1


class Script:
    """A probe that answers as scripted, then holds the next ping until the test ends."""

    def __init__(self, answers: list[bool]) -> None:
        self.asked: list[float] = []
        self.done = asyncio.Event()
        self._replies: Iterator[bool] = iter(answers)

    async def __call__(self, row: int, timeout: float) -> bool:
        self.asked.append(timeout)
        for reply in self._replies:
            return reply
        self.done.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "PROBE_EVERY", 0.0)


def watched(answers: list[bool]) -> tuple[WorkerProcesses, Script]:
    script = Script(answers)
    return WorkerProcesses(1, lambda row: [], (), lambda row: None, probe=script), script


async def test_a_worker_that_misses_its_pings_in_a_row_is_killed() -> None:
    workers, script = watched([True, *[False] * PROBE_MISSES])
    proc = Proc()
    await workers._watch(0, proc)  # type: ignore[arg-type]
    assert proc.killed == 1 and workers.hung == {0: 1}
    assert len(script.asked) == 1 + PROBE_MISSES


async def test_a_worker_that_answers_between_misses_is_left_alone() -> None:
    workers, script = watched([False, True] * 5)
    proc = Proc()
    watch = asyncio.create_task(workers._watch(0, proc))  # type: ignore[arg-type]
    await script.done.wait()  # all ten answered, the eleventh ping held
    watch.cancel()
    assert proc.killed == 0 and workers.hung == {0: 0}


async def test_a_worker_that_exited_meanwhile_is_not_killed_twice() -> None:
    workers, _ = watched([False] * PROBE_MISSES)
    proc = Proc()
    proc.returncode = -9
    await workers._watch(0, proc)  # type: ignore[arg-type]
    assert proc.killed == 0 and workers.hung == {0: 0}


async def test_without_a_probe_nothing_is_watched() -> None:
    workers = WorkerProcesses(1, lambda row: [], (), lambda row: None)
    proc = Proc()
    await asyncio.wait_for(workers._watch(0, proc), 1)  # type: ignore[arg-type]
    assert proc.killed == 0
