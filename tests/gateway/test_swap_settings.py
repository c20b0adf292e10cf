"""`swaps` and the scheduler's keys of `models[].on_demand` and `api_keys[]`: from the config
to the switchboard, with the options another setting would leave without effect refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends.cost_policy import CostPolicy
from backends.discovery import resolve
from backends.placement import placement_problems
from backends.swap_policy import LruPolicy
from backends.swaps import BatchWindows
from gateway.app import build_runtime
from gateway.config_file import ConfigError, settings_from_dict
from gateway.keys import key_ring
from gateway.specs import backend_specs, on_demand_config, swap_policy, swapped_names, switchboard
from tests.gateway.test_specs import NeverReady


def od(name: str, share: float = 0.6, **on_demand: Any) -> dict[str, Any]:
    vllm = {"model": "/models/m", "gpus": [0], "args": {"gpu-memory-utilization": share}}
    return {"name": name, "vllm": vllm, "on_demand": on_demand}


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw, env={})
    return info.value.problems


def test_the_cost_policy_is_the_default_with_its_window_and_groups() -> None:
    settings = settings_from_dict(
        {"models": [od("a")], "swaps": {"groups": [{"gpus": [0, 1], "batch_window": 90}]}}, env={}
    )
    policy, windows = swap_policy(settings)
    assert isinstance(policy, CostPolicy)
    assert windows.for_gpus([1]) == [90] and windows.for_gpus([2]) == ["auto"]
    board = switchboard(settings, NeverReady())
    assert isinstance(board.policy, CostPolicy) and board.windows.for_gpus([0]) == [90]


def test_a_batch_window_is_seconds_or_auto_and_anything_else_is_one_problem() -> None:
    groups = [{"gpus": [0], "batch_window": "auto"}]
    settings = settings_from_dict(
        {"models": [od("a")], "swaps": {"batch_window": 0, "groups": groups}}, env={}
    )
    assert swap_policy(settings)[1] == BatchWindows(0.0, ((frozenset({0}), "auto"),))
    for bad in ("soon", -1, True):
        assert problems({"models": [od("a")], "swaps": {"batch_window": bad}}) == [
            "swaps.batch_window: expected seconds (a number, 0 or more) or auto"
        ]


def test_lru_stays_selectable_and_refuses_what_only_the_cost_policy_reads() -> None:
    settings = settings_from_dict({"models": [od("a")], "swaps": {"policy": "lru"}}, env={})
    assert isinstance(swap_policy(settings)[0], LruPolicy)
    found = problems(
        {"models": [od("a", priority=1)], "swaps": {"policy": "lru", "batch_window": 5}}
    )
    assert found == [
        "swaps.batch_window: applies only with `policy: cost`; set that or leave it out"
    ]
    found = problems({"models": [od("a", priority=1)], "swaps": {"policy": "lru"}})
    assert found == ["models[0].on_demand.priority: applies only with `swaps.policy: cost`"]


def test_priority_pinning_level_and_first_costs_reach_the_model() -> None:
    settings = settings_from_dict(
        {
            "models": [
                od(
                    "a",
                    priority=2,
                    pinned=True,
                    unload="sleep",
                    sleep_level="auto",
                    costs={"start": 70, "wake_2": 2.4},
                )
            ]
        },
        env={},
    )
    config = on_demand_config(settings.models[0], settings)
    assert (config.priority, config.pinned, config.sleep_level) == (2, True, "auto")
    assert dict(config.costs) == {"start": 70.0, "wake_2": 2.4}
    model = switchboard(settings, NeverReady()).models["a"]
    assert model.costs.cost("start") == 70.0 and model.costs.wake(2) == 2.4
    assert problems({"models": [od("a", costs={"boot": 5})]}) == [
        "models[0].on_demand.costs.boot: unknown option (check the spelling)"
    ]


def test_a_key_may_set_its_requests_max_wait() -> None:
    raw = {"models": [od("a")], "api_keys": [{"name": "team", "key": "sk-t", "max_wait": 30}]}
    ring = key_ring(settings_from_dict(raw, env={}))
    assert ring.identify(b"sk-t").max_wait == 30  # type: ignore[union-attr]
    raw["api_keys"] = [{"name": "team", "key": "sk-t", "max_wait": 0}]
    assert problems(raw) == ["api_keys[0].max_wait: Input should be greater than 0"]


def test_pinned_models_must_fit_their_gpus_together_as_always_on_ones_do() -> None:
    settings = settings_from_dict({"models": [od("a", pinned=True), od("b", pinned=True)]}, env={})
    found = placement_problems(backend_specs(settings), 1, swapped_names(settings))
    assert len(found) == 1 and "GPU 0: gpu-memory-utilization adds up to 1.20" in found[0]
    swapping = settings_from_dict({"models": [od("a", pinned=True), od("b")]}, env={})
    found = placement_problems(backend_specs(swapping), 1, swapped_names(swapping))
    assert found == [
        "b: on-demand, but its share 0.6 never fits GPU 0 beside the always-on models there (0.60)"
    ]


async def test_a_reload_changes_the_policy_and_the_unmeasured_first_costs_in_place(
    tmp_path: Path,
) -> None:
    def config(**swaps: Any) -> dict[str, Any]:
        models = [od("a", costs={"start": 60 if not swaps else 90}), od("b")]
        return {"models": models, "log_dir": str(tmp_path), "swaps": swaps}

    settings = settings_from_dict(config(), env={})
    runtime = build_runtime(settings, None, resolve)
    board, a = runtime.board, runtime.board.models["a"]
    assert isinstance(board.policy, CostPolicy) and a.costs.cost("start") == 60
    new = settings_from_dict(config(policy="lru"), env={})
    await runtime.use(new, key_ring(new))
    assert isinstance(board.policy, LruPolicy)
    assert runtime.board.models["a"] is a and a.costs.cost("start") == 90
