"""The command line: check and plan every shipped config, refuse bad ones with clear lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.state_dir import ServerRecord
from gateway.commands.cli import main
from tests.servers import ROOT

CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_checks_and_plans(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(config)]) == 0
    assert main(["plan", "--config", str(config)]) == 0
    assert "GPU map:" in capsys.readouterr().out


def test_seed_plan_shares_gpu_7_between_three_models(capsys: pytest.CaptureFixture[str]) -> None:
    main(["plan", "--config", str(ROOT / "config" / "seed-8x80gb.yaml")])
    out = capsys.readouterr().out
    assert "GPU 7: 95% used by qwen2.5-vl-72b-instruct (85%), bce-embedding-base_v1 (5%)" in out
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in out
    assert '--limit-mm-per-prompt \'{"image":4,"video":1}\'' in out


def write(tmp_path: Path, config: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_invalid_config_names_each_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"models": [{"name": "a", "url": "http://h:1"}, {"name": "b", "url": "nope"}]}
    assert main(["check", "--config", write(tmp_path, config)]) == 2
    assert "  models[1].url: not an http(s) URL" in capsys.readouterr().err


def test_layouts_that_cannot_work_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def spawn(name: str, gpus: list[int], share: float) -> dict[str, Any]:
        return {
            "name": name,
            "vllm": {"model": name, "gpus": gpus, "args": {"gpu-memory-utilization": share}},
        }

    config = {"models": [spawn("a", [0], 0.7), spawn("b", [0], 0.5)]}
    assert main(["check", "--config", write(tmp_path, config)]) == 2
    assert (
        "GPU 0: gpu-memory-utilization adds up to 1.20 > 0.95 (a 0.7, b 0.5)"
        in capsys.readouterr().err
    )


def test_check_warns_when_weights_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "gpu_memory_gib": 80,
        "models": [{"name": "big", "vllm": {"model": "Qwen/Qwen2.5-72B-Instruct", "gpus": [0]}}],
    }
    assert main(["check", "--config", write(tmp_path, config)]) == 0  # a warning, not a refusal
    assert "warning: big: weights need ~144 GB" in capsys.readouterr().err


def test_plan_names_the_on_demand_models_that_take_turns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def model(name: str, share: float, on_demand: bool) -> dict[str, Any]:
        vllm = {"model": name, "gpus": [0], "args": {"gpu-memory-utilization": share}}
        return {"name": name, "vllm": vllm, **({"on_demand": {}} if on_demand else {})}

    config = {
        "models": [model("embed", 0.2, False), model("chat", 0.6, True), model("r1", 0.6, True)]
    }
    assert main(["plan", "--config", write(tmp_path, config)]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: 20% used by embed (20%); on demand: chat (60%), r1 (60%)" in out
    assert "GPU 0: chat and r1 never run together (they swap)" in out


def test_check_warns_of_an_old_option_name_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"models": [{"name": "m", "url": "http://127.0.0.1:9"}], "max_header_bytes": 8192}
    assert main(["check", "--config", write(tmp_path, config)]) == 0
    err = capsys.readouterr().err
    assert "warning: deprecated: " in err and "`max_header_bytes` is now `max_head_bytes`" in err


async def _leave_a_server_running(log_dir: Path) -> ServerRecord:
    from backends.lifecycle import BackendState
    from backends.state_dir import StateDir
    from backends.supervisor import Supervisor
    from tests.backends.test_supervisor import FAST, fake_spec
    from tests.helpers import until

    state = StateDir(log_dir / "state")
    sup = Supervisor(
        [fake_spec()], log_dir=log_dir, timings=FAST, state_dir=state, keep_backends=60
    )
    await sup.start()
    await until(lambda: sup.replicas("m")[0].state is BackendState.READY)
    await sup.stop()
    (record,) = state.records()
    return record


@pytest.mark.servers
def test_stop_backends_ends_the_servers_a_stopped_gateway_left_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from backends.proctree import group_members

    config = {"log_dir": str(tmp_path / "logs"), "models": [{"name": "x", "url": "http://h:1"}]}
    record = asyncio.run(_leave_a_server_running(tmp_path / "logs"))
    assert group_members(record.pgid)
    assert main(["stop-backends", "--config", write(tmp_path, config)]) == 0
    assert not group_members(record.pgid)
    assert f"m: ended (process group {record.pgid})" in capsys.readouterr().out
    assert main(["stop-backends", "--config", write(tmp_path, config)]) == 0  # nothing left


def test_stop_backends_is_refused_while_a_gateway_holds_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from backends.state_dir import StateDir

    held = StateDir(tmp_path / "state")
    held.lock()
    config = {"state_dir": str(held.path), "models": [{"name": "x", "url": "http://h:1"}]}
    try:
        assert main(["stop-backends", "--config", write(tmp_path, config)]) == 2
    finally:
        held.unlock()
    assert "another running gateway" in capsys.readouterr().err


def test_serve_is_refused_with_one_line_while_another_gateway_holds_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from backends.state_dir import StateDir

    held = StateDir(tmp_path / "state")
    held.lock()
    config = {"state_dir": str(held.path), "models": [{"name": "x", "url": "http://h:1"}]}
    try:
        assert main(["serve", "--config", write(tmp_path, config), "--port", "0"]) == 2
    finally:
        held.unlock()
    assert "is used by another running gateway" in capsys.readouterr().err
