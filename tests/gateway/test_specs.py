"""From the config to the supervisor: a spawned model's `health` settings are honoured."""

from __future__ import annotations

from pathlib import Path

from backends.supervisor import SpawnHealth, Supervisor
from gateway.specs import backend_specs, spawn_health
from tests.servers import gateway_settings

SPAWN = {"model": "/models/m"}


def test_fields_a_config_sets_apply_and_the_rest_keep_spawn_defaults(tmp_path: Path) -> None:
    settings = gateway_settings(
        [
            {"name": "tuned", "vllm": SPAWN, "health": {"interval": 1, "unhealthy_threshold": 5}},
            {"name": "default", "vllm": SPAWN},
            {"name": "connected", "url": "http://127.0.0.1:9", "health": {"interval": 1}},
        ]
    )
    found = spawn_health(settings)
    assert found == {"tuned": SpawnHealth(interval=1.0, timeout=5.0, failures=5)}
    supervisor = Supervisor(backend_specs(settings), log_dir=tmp_path, health=found)
    assert supervisor.backends["tuned"].health == SpawnHealth(1.0, 5.0, 5)
    assert supervisor.backends["default"].health == SpawnHealth()  # 5 s, 5 s, 3 failures
