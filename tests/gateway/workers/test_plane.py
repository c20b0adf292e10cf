"""The control plane and its workers on one event loop: the real ``Plane`` and ``Worker``
over real unix-socket channels, backends in-process (``gateway.inprocess``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import generate_latest

from backends.discovery import resolve
from backends.lifecycle import BackendState
from gateway.app import build_runtime
from gateway.workers.counters import InFlightTable
from gateway.workers.plane import Plane
from gateway.workers.worker import ControlPlaneGone, Worker
from tests.gateway.asgi import Call
from tests.gateway.workers.rig import URLS, Gateway, two_workers
from tests.helpers import until
from tests.servers import gateway_settings


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with two_workers(tmp_path, {}) as gw:
        yield gw


def chat(worker: Worker) -> Call:
    body = orjson.dumps({"model": "m", "messages": []})
    return Call(worker, body=body)


async def test_each_worker_has_the_table_and_relays_by_it(gateway: Gateway) -> None:
    for worker in gateway.workers:
        call = await chat(worker).done()
        assert call.status == 200
        assert [r.url for r in worker.mirror.pools[0].replicas] == URLS


async def test_a_state_change_reaches_every_worker(gateway: Gateway) -> None:
    life = gateway.runtime.lives["m"]
    await life.move(BackendState.UNHEALTHY, life.replicas[0])
    mirrored = [worker.mirror.pools[0].replicas[0] for worker in gateway.workers]
    await until(lambda: all(r.state is BackendState.UNHEALTHY for r in mirrored), what="it")


async def test_a_drain_counts_a_request_a_worker_sent_before_it_saw_the_replica_leave(
    gateway: Gateway,
) -> None:
    life = gateway.runtime.lives["m"]
    replica = life.replicas[0]
    await life.move(BackendState.DRAINING, replica)
    pool = gateway.workers[1].mirror.pools[0]
    stale = pool.replicas[0]
    assert stale.ready  # the worker has not seen the move yet
    lease = stale.lease(pool)
    assert replica.in_flight == 0  # nor has the control plane seen the request
    drain = asyncio.create_task(life.drained([replica], timeout=10))
    await until(lambda: replica.in_flight == 1, what="the request counted")
    links = gateway.plane.links.values()
    await until(lambda: all(link.acked == gateway.plane.generation for link in links))
    for _ in range(5):
        await asyncio.sleep(0)  # the drain's own steps, had it nothing to wait for
    assert not drain.done()
    lease.release()
    assert await drain


async def test_a_dead_workers_requests_end_with_it(gateway: Gateway) -> None:
    life = gateway.runtime.lives["m"]
    pool = gateway.workers[0].mirror.pools[0]
    leases = [pool.replicas[1].lease(pool) for _ in range(3)]
    await until(lambda: life.replicas[1].in_flight == 3, what="three in flight")
    drain = asyncio.create_task(life.drained(timeout=10))
    gateway.plane.worker_exited(0)  # as the process supervisor tells it once the pid is gone
    assert await drain
    assert life.replicas[1].in_flight == 0
    assert leases  # never released: their worker is gone


async def test_metrics_show_every_workers_requests_and_keep_a_dead_workers(
    gateway: Gateway,
) -> None:
    for worker, count in zip(gateway.workers, (3, 2), strict=True):
        for _ in range(count):
            assert (await chat(worker).done()).status == 200
    await gateway.runtime.telemetry.gathered()
    text = generate_latest(gateway.runtime.telemetry.metrics.registry).decode()
    assert 'status="200"} 5.0' in text
    assert 'kind="completion",model="m"} 10.0' in text
    gateway.plane.worker_exited(1)
    del gateway.plane.links[1]  # its channel closes with its process
    await gateway.runtime.telemetry.gathered()
    text = generate_latest(gateway.runtime.telemetry.metrics.registry).decode()
    assert 'status="200"} 5.0' in text  # counters never go back
    status = gateway.runtime.status.document()
    assert status["models"][0]["recent"]["requests"] == 3  # the live worker's window


async def test_a_worker_that_started_before_a_reload_runs_the_config_in_force(
    tmp_path: Path,
) -> None:
    """It read generation 1 at its start; by its hello, 2 is in force: it is told at once, and
    reads what the control plane validated, not the user's file."""
    models = [{"name": "m", "urls": URLS}]
    old = gateway_settings(models, log_dir=str(tmp_path), api_keys=["sk-old"])
    new = gateway_settings(models, log_dir=str(tmp_path), api_keys=["sk-old", "sk-new"])
    runtime = build_runtime(old, None, resolve)
    generation = [1]
    table = InFlightTable.create(rows=1, slots=16)
    plane = Plane(runtime, table, tmp_path, generation=lambda: generation[0])
    await plane.start()
    worker = Worker(old, row=0, table=None, private_dir=tmp_path, generation=1, overrides={})
    runtime.settings, generation[0] = new, 2  # the reload, while the worker starts
    try:
        async with worker.lifespan():
            await until(lambda: worker.generation == 2, what="the config in force")
            assert worker.keys.identify(b"sk-new") is not None
    finally:
        await plane.stop()


async def test_prefix_routes_in_metrics_are_every_workers_choices(tmp_path: Path) -> None:
    async with two_workers(tmp_path, {"balance": "prefix"}) as gw:
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 600}]})
        for worker in gw.workers:
            assert (await Call(worker, body=body).done()).status == 200
        await gw.runtime.telemetry.gathered()
        text = generate_latest(gw.runtime.telemetry.metrics.registry).decode()
        routes = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm_gateway_prefix_routes_total{")
        ]
        assert sum(routes) == 2  # one choice on each worker


async def test_a_worker_whose_control_plane_goes_before_its_first_table_fails_its_start(
    tmp_path: Path,
) -> None:
    """Not after a minute's wait: a control plane killed while its workers start takes them
    with it at once."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # its hello
        writer.close()

    server = await asyncio.start_unix_server(hang_up, str(tmp_path / "workers.sock"))
    settings = gateway_settings([{"name": "m", "urls": URLS}], log_dir=str(tmp_path))
    worker = Worker(settings, row=0, table=None, private_dir=tmp_path, generation=1, overrides={})
    try:
        with pytest.raises(ControlPlaneGone, match="closed its channel"):
            async with asyncio.timeout(10):
                async with worker.lifespan():
                    pass
    finally:
        server.close()
