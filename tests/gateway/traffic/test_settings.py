"""Queues and priorities in the config: `models[].queue`, a key's `priority`,
`priority_range` and `weight`, the old `on_demand.max_waiting`, and a reload that changes a
queue in place."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from backends.discovery import resolve
from backends.queues import QueueLimits
from gateway.app import build_runtime
from gateway.config_file import ConfigError
from gateway.keys import KeyRing, api_key, key_ring
from gateway.reload_plan import plan_reload
from gateway.traffic.admission import priority_scheduling, queue_limits, ticket, with_priority
from gateway.traffic.priorities import LAST, parse
from tests.helpers import until
from tests.servers import gateway_settings

URL = "http://127.0.0.1:9"
SPAWN = {"model": "/models/m"}


def problems(models: list[dict[str, Any]], **extra: Any) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        gateway_settings(models, **extra)
    return refused.value.problems


def test_priorities_are_names_or_integers_and_lower_goes_first() -> None:
    assert [parse(b"interactive"), parse(b"default"), parse(b"batch")] == [-10, 0, 10]
    assert parse(b" -3 ") == -3 and parse(b"BATCH") == 10


def test_a_key_has_a_priority_a_range_and_a_weight() -> None:
    settings = gateway_settings(
        [{"name": "m", "url": URL}],
        api_keys=[
            {"name": "plain", "key": "k1"},
            {"name": "nightly", "key": "k2", "priority": "batch", "weight": 3},
            {"name": "ui", "key": "k3", "priority": 0, "priority_range": ["interactive", 5]},
        ],
    )
    plain, nightly, ui = (api_key(k, settings.canonical_names) for k in settings.api_keys)
    assert (plain.priority, plain.priorities, plain.weight) == (0, (0, LAST), 1.0)
    assert (nightly.priority, nightly.priorities, nightly.weight) == (10, (10, LAST), 3.0)
    assert (ui.priority, ui.priorities) == (0, (-10, 5))
    assert ticket(ui, b"interactive").priority == -10 and ticket(ui, None).priority == 0


def test_a_keys_priority_outside_its_range_or_a_range_upside_down_is_an_error() -> None:
    assert problems(
        [{"name": "m", "url": URL}],
        api_keys=[
            {"name": "a", "key": "k1", "priority": "batch", "priority_range": [-10, 0]},
            {"name": "b", "key": "k2", "priority_range": ["batch", "interactive"]},
            {"name": "c", "key": "k3", "priority": "urgent"},
        ],
    ) == [
        "api_keys[0].priority: lies outside its own `priority_range`",
        "api_keys[1].priority_range: write it `[first, last]`: lower first",
        "api_keys[2].priority: a priority is one of interactive, default, batch or an integer",
    ]


def test_without_keys_the_header_alone_decides() -> None:
    assert ticket(None, b"batch").priority == 10 and ticket(None, None).priority == 0


def test_a_queue_without_a_cap_on_an_always_on_model_is_an_error() -> None:
    assert problems([{"name": "m", "url": URL, "queue": {"max_waiting": 5, "max_wait": 3}}]) == [
        "models[0].queue.max_waiting: nothing waits without `queue.max_in_flight` (or `on_demand`)",
        "models[0].queue.max_wait: nothing waits without `queue.max_in_flight` (or `on_demand`)",
    ]


def test_reserved_slots_are_priorities_with_growing_counts_within_the_cap() -> None:
    queue = {"max_in_flight": 8, "reserved": {"default": 4, "interactive": 2}}
    settings = gateway_settings([{"name": "m", "url": URL, "queue": queue}])
    assert queue_limits(settings.models[0], settings).reserved == ((-10, 2), (0, 4))
    bad = [
        {"name": "a", "url": URL, "queue": {"reserved": {"interactive": 1}}},
        {"name": "b", "url": URL, "queue": {"max_in_flight": 2, "reserved": {"interactive": 2}}},
        {"name": "c", "url": URL, "queue": {"max_in_flight": 8, "reserved": {-10: 3, 0: 2}}},
        {"name": "d", "url": URL, "queue": {"max_in_flight": 8, "reserved": {"batch": 0}}},
    ]
    found = problems(bad)
    assert found[:3] == [
        "models[0].queue.reserved: keeps slots of `max_in_flight`: set that too",
        "models[1].queue.reserved.interactive: keeps 2 of `max_in_flight` 2: worse priorities "
        "would get none",
        "models[2].queue.reserved.0: keeps 2, no more than the 3 a better priority keeps, "
        "which are kept for it too: give a worse priority more",
    ]
    assert found[3].startswith("models[3].queue.reserved.batch: ")  # at least 1


def test_on_demand_max_waiting_still_bounds_the_queue_with_a_warning_and_both_is_an_error() -> None:
    old = gateway_settings([{"name": "m", "vllm": SPAWN, "on_demand": {"max_waiting": 3}}])
    assert queue_limits(old.models[0], old).max_waiting == 3
    assert any("queue.max_waiting" in line for line in old.deprecations)
    new = gateway_settings(
        [{"name": "m", "vllm": SPAWN, "on_demand": {}, "queue": {"max_waiting": 4}}],
        retry_after={"loading": 7},
    )
    assert queue_limits(new.models[0], new) == QueueLimits(max_waiting=4, retry_after_starting=7)
    assert not new.deprecations
    assert problems(
        [
            {
                "name": "m",
                "vllm": SPAWN,
                "on_demand": {"max_waiting": 3},
                "queue": {"max_waiting": 4},
            }
        ]
    ) == ["models[0].on_demand.max_waiting: is now `queue.max_waiting`; give only that"]


def test_a_model_without_a_queue_keeps_todays_behaviour() -> None:
    settings = gateway_settings(
        [{"name": "m", "url": URL}, {"name": "od", "vllm": SPAWN, "on_demand": {}}]
    )
    runtime = build_runtime(settings, None, resolve)
    plain, od = runtime.pools
    assert plain.queue is None  # no cap: requests go straight on, as before queues
    assert od.queue is runtime.lives["od"].queue  # on demand: the start waits in its queue
    assert od.queue.limits == QueueLimits(max_waiting=256)


def test_the_priority_goes_to_vllm_only_with_its_priority_scheduling() -> None:
    settings = gateway_settings(
        [
            {"name": "p", "vllm": {**SPAWN, "args": {"scheduling-policy": "priority"}}},
            {"name": "f", "vllm": {**SPAWN, "args": {"scheduling-policy": "fcfs"}}},
            {"name": "c", "url": URL},
        ]
    )
    assert [priority_scheduling(m) for m in settings.models] == [True, False, False]
    runtime = build_runtime(settings, None, resolve)
    assert [p.priority_field for p in runtime.pools] == [True, False, False]


def test_a_body_is_told_the_priority_only_on_paths_whose_vllm_request_has_one() -> None:
    from gateway.job import Job

    pool = build_runtime(gateway_settings([{"name": "m", "url": URL}]), None, resolve).pools[0]
    job = Job(pool, b'{"model":"m","prompt":"hi"}', "m", None)
    assert (
        with_priority(job, "/v1/completions", 10).body
        == b'{"model":"m","prompt":"hi","priority":10}'
    )
    assert with_priority(job, "/v1/completions", 0) is job  # vLLM's default: untouched
    assert with_priority(job, "/tokenize", 10) is job


async def test_a_reload_changes_a_queue_in_place_and_its_waiters_stay() -> None:
    models = [{"name": "m", "url": URL, "queue": {"max_in_flight": 1}}]
    old = gateway_settings(models)
    runtime = build_runtime(old, None, resolve)
    pool = runtime.pool("m")
    queue = pool.queue
    assert queue is not None
    held = await queue.admit()
    waiting = asyncio.create_task(queue.admit(priority=10, key="k"))
    await until(lambda: queue.waiting == 1, what="one waiting")
    new = gateway_settings([{**models[0], "queue": {"max_in_flight": 2, "max_wait": 30}}])
    assert [c.action for c in plan_reload(old, new, gpu_count=0).changes] == ["update"]
    await runtime.use(new, key_ring(new))
    assert pool.queue is queue and queue.limits.max_in_flight == 2  # the same queue
    slot = await waiting  # the higher cap let it go at once
    uncapped = gateway_settings([{"name": "m", "url": URL}])
    await runtime.use(uncapped, key_ring(uncapped))
    assert pool.queue is None  # no cap any more: requests go straight on
    for each in (held, slot):
        each.release()


async def test_a_reload_that_keeps_slots_applies_in_place() -> None:
    models = [{"name": "m", "url": URL, "queue": {"max_in_flight": 2}}]
    old = gateway_settings(models)
    runtime = build_runtime(old, None, resolve)
    queue = runtime.pool("m").queue
    assert queue is not None
    held = await queue.admit(priority=10)
    reserving = [{**models[0], "queue": {"max_in_flight": 2, "reserved": {"interactive": 1}}}]
    new = gateway_settings(reserving)
    assert [c.action for c in plan_reload(old, new, gpu_count=0).changes] == ["update"]
    await runtime.use(new, key_ring(new))
    assert runtime.pool("m").queue is queue and queue.limits.reserved == ((-10, 1),)
    batch = asyncio.create_task(queue.admit(priority=10))
    await until(lambda: queue.waiting == 1, what="the batch request waiting")
    interactive = await queue.admit(priority=-10)  # the kept slot
    for slot in (interactive, held):
        slot.release()
    (await batch).release()


def test_the_config_in_the_traffic_guide_validates() -> None:
    import re

    import yaml

    from gateway.config_file import settings_from_dict

    guide = (Path(__file__).parents[3] / "docs" / "traffic.md").read_text(encoding="utf-8")
    section = guide.split("## Queues and priorities", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    settings = settings_from_dict(yaml.safe_load(block), env={})
    assert settings.models[0].queue is not None and not settings.deprecations


async def test_a_keys_file_sets_priority_and_weight_and_a_reload_changes_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {name: nightly, key: sk-n, priority: batch, weight: 2}\n")
    ring = KeyRing([], {"m": "m"}, path)
    key = ring.identify(b"sk-n")
    assert key is not None and (key.priority, key.weight) == (10, 2.0)
    path.write_text("keys:\n  - {name: nightly, key: sk-n, priority: interactive}\n")
    assert await ring.reload()
    key = ring.identify(b"sk-n")  # the next request of this key waits where it now says
    assert key is not None and (key.priority, key.weight) == (-10, 1.0)
