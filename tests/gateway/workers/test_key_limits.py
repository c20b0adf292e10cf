"""Per-key limits with `workers: N` and no Redis: one table for the host, made by the control
plane, each worker its own column of it; a dead worker's slots given back, a key added by a
reload limited on every worker. The same through real processes: test_limits_processes.py."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.errors import RateLimited
from gateway.inprocess import Reply, Sent
from gateway.keys import ApiKey
from gateway.limits.redis_store import RedisLimits
from gateway.limits.shared import SharedLimits
from gateway.workers.limits import host_table, worker_key_limiter
from gateway.workers.worker import Worker
from tests.gateway.asgi import Call
from tests.gateway.workers.rig import URLS, two_workers
from tests.helpers import until
from tests.servers import gateway_settings

MODELS = [{"name": "m", "url": "http://a"}]


def chat(worker: Worker, key: str) -> Call:
    body = orjson.dumps({"model": "m", "messages": []})
    return Call(worker, body=body, headers=[(b"authorization", b"Bearer " + key.encode())])


def test_without_redis_the_control_plane_makes_one_table_and_each_worker_counts_in_it() -> None:
    settings = gateway_settings(MODELS, workers=2)
    table = host_table(settings)
    assert table is not None and table.workers == 2
    try:
        first, second = (worker_key_limiter(settings, row, table.where) for row in (0, 1))
        assert isinstance(first, SharedLimits) and isinstance(second, SharedLimits)
        key = ApiKey("k", b"d" * 32, None, requests_per_minute=3, max_concurrent=2)
        assert first.admit(key) and second.admit(key)
        with pytest.raises(RateLimited, match="2 requests in flight"):
            first.admit(key)
        second.release(key)
        assert first.admit(key)  # the third token; the bucket is empty now
        first.release(key)
        with pytest.raises(RateLimited, match="3 requests per minute"):
            second.admit(key)
    finally:
        table.close()


def test_with_redis_the_workers_count_there_and_no_table_is_made() -> None:
    settings = gateway_settings(MODELS, workers=2, limits_store="redis://127.0.0.1:9/0")
    assert host_table(settings) is None
    assert isinstance(worker_key_limiter(settings, 0, None), RedisLimits)


async def test_a_keys_requests_per_minute_are_one_budget_for_both_workers(tmp_path: Path) -> None:
    keys = [{"name": "k", "key": "sk-k", "requests_per_minute": 3}]
    async with two_workers(tmp_path, {}, api_keys=keys) as gw:
        statuses = []
        for i in range(6):
            call = await chat(gw.workers[i % 2], "sk-k").done()
            statuses.append(call.status)
        assert statuses == [200, 200, 200, 429, 429, 429]
        assert int(call.headers[b"retry-after"]) > 0


async def test_max_concurrent_holds_across_workers_and_a_dead_workers_slots_come_back(
    tmp_path: Path,
) -> None:
    held: list[Reply] = []

    async def slow(sent: Sent) -> Reply:
        reply = Reply.stream([b"{}"], more=True)
        held.append(reply)
        return reply

    keys = [{"name": "k", "key": "sk-k", "max_concurrent": 2}]
    async with two_workers(tmp_path, {}, slow, api_keys=keys) as gw:
        first, second = gw.workers
        streams = [chat(first, "sk-k").start(), chat(second, "sk-k").start()]
        await until(lambda: len(held) == 2, what="a request in flight on each worker")
        for worker in gw.workers:
            assert (await chat(worker, "sk-k").done()).status == 429
        gw.plane.worker_exited(0)  # as the process supervisor tells it once the pid is gone
        third = chat(second, "sk-k").start()
        await until(lambda: len(held) == 3, what="the dead worker's slot taken again")
        assert (await chat(second, "sk-k").done()).status == 429  # two again: the live ones
        for reply in held:
            reply.end()
        for call in [*streams, third]:
            assert (await call.done()).status == 200


async def test_a_key_added_by_a_reload_is_limited_across_both_workers(tmp_path: Path) -> None:
    async with two_workers(tmp_path, {}, api_keys=["sk-old"]) as gw:
        late = {"name": "late", "key": "sk-late", "requests_per_minute": 2}
        models = [{"name": "m", "urls": URLS}]
        new = gateway_settings(models, log_dir=str(tmp_path), workers=2, api_keys=["sk-old", late])
        gw.runtime.settings = new  # the reload, as the control plane applies it
        gw.plane.config_generation = lambda: 2
        await until(lambda: all(w.generation == 2 for w in gw.workers), what="the reload")
        statuses = [(await chat(w, "sk-late").done()).status for w in (*gw.workers, *gw.workers)]
        assert statuses == [200, 200, 429, 429]
