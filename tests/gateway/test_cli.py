"""The command line: check and plan every shipped config, refuse bad ones with clear lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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


def write(tmp_path: Path, config: dict) -> str:
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
    def spawn(name: str, gpus: list[int], share: float) -> dict:
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
    def model(name: str, share: float, on_demand: bool) -> dict:
        vllm = {"model": name, "gpus": [0], "args": {"gpu-memory-utilization": share}}
        return {"name": name, "vllm": vllm, **({"on_demand": {}} if on_demand else {})}

    config = {
        "models": [model("embed", 0.2, False), model("chat", 0.6, True), model("r1", 0.6, True)]
    }
    assert main(["plan", "--config", write(tmp_path, config)]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: 20% used by embed (20%); on demand: chat (60%), r1 (60%)" in out
    assert "GPU 0: chat and r1 never run together (they swap)" in out
