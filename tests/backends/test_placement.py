"""Layouts that cannot work are refused before anything starts, naming the models involved."""

from backends.placement import gpu_map, placement_problems
from backends.spec import VllmSpec


def spec(name: str, gpus: tuple[int, ...], share: float = 0.9, **args: object) -> VllmSpec:
    return VllmSpec(
        name=name, model=name, gpus=gpus, args={"gpu-memory-utilization": share, **args}
    )


def test_models_sharing_a_gpu_within_095_fit() -> None:
    specs = [spec("embed", (7,), 0.3), spec("rerank", (7,), 0.3), spec("chat", (0, 1), 0.9)]
    assert placement_problems(specs, gpu_count=8) == []
    assert gpu_map(specs) == {
        0: [("chat", 0.9)],
        1: [("chat", 0.9)],
        7: [("embed", 0.3), ("rerank", 0.3)],
    }


def test_oversubscribed_gpu_is_refused() -> None:
    found = placement_problems([spec("a", (0,), 0.6), spec("b", (0,), 0.5)], gpu_count=1)
    assert found == [
        "GPU 0: gpu-memory-utilization adds up to 1.10 > 0.95 (a 0.6, b 0.5); "
        "lower the shares, move a model or make some on-demand"
    ]


def test_on_demand_models_may_oversubscribe_a_gpu_and_take_turns() -> None:
    specs = [spec("embed", (0,), 0.2), spec("chat", (0,), 0.6), spec("reasoner", (0,), 0.7)]
    assert placement_problems(specs, 1, on_demand={"chat", "reasoner"}) == []
    assert placement_problems(specs, 1, on_demand={"chat"}) != []  # reasoner is always on


def test_an_on_demand_model_that_never_fits_beside_the_always_on_ones_is_refused() -> None:
    specs = [spec("chat", (0,), 0.6), spec("big", (0,), 0.5)]
    assert placement_problems(specs, 1, on_demand={"big"}) == [
        "big: on-demand, but its share 0.5 never fits GPU 0 beside the always-on models "
        "there (0.60)"
    ]


def test_tensor_parallel_must_match_gpu_count() -> None:
    found = placement_problems([spec("big", (0, 1, 2), **{"tensor-parallel-size": 2})], None)
    assert found == [
        "big: tensor-parallel-size x pipeline-parallel-size is 2 but 3 GPUs are listed (0,1,2)"
    ]


def test_missing_gpu_is_refused_when_the_count_is_known() -> None:
    found = placement_problems([spec("a", (6, 7))], gpu_count=4)
    assert found == ["a: GPU 6,7 does not exist (this machine has 4: 0-3)"]
    assert placement_problems([spec("a", (6, 7))], gpu_count=None) == []


GB80 = 80 * 2**30


def test_weights_are_estimated_from_the_name_and_quantization() -> None:
    from backends.placement import weight_bytes

    assert weight_bytes(spec("Qwen/Qwen2.5-72B-Instruct", (0,)))[0] == 144e9
    fp8 = VllmSpec(name="v", model="Qwen/Qwen2.5-VL-72B-Instruct", args={"quantization": "fp8"})
    assert weight_bytes(fp8)[0] == 72e9
    assert weight_bytes(spec("maidalun1020/bce-embedding-base_v1", (0,))) is None


def test_weights_are_read_from_local_files(tmp_path) -> None:
    from backends.placement import weight_bytes

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert weight_bytes(VllmSpec(name="m", model=str(tmp_path))) == (1000.0, "safetensors files")


def test_a_model_that_cannot_fit_is_warned_about_with_numbers() -> None:
    from backends.placement import fit_warnings

    too_big = VllmSpec(
        name="big", model="Qwen2.5-72B-Instruct", gpus=(0,), args={"gpu-memory-utilization": 0.9}
    )
    (warning,) = fit_warnings([too_big], GB80)
    assert warning.startswith("big: weights need ~144 GB (72B parameters in the name) but 1 GPU(s)")
    tensor_parallel = VllmSpec(
        name="big",
        model="Qwen2.5-72B-Instruct",
        gpus=(0, 1, 2, 3),
        args={"gpu-memory-utilization": 0.9},
    )
    assert fit_warnings([tensor_parallel], GB80) == []
    assert fit_warnings([too_big], None) == []  # GPU size unknown: no guess


def test_plan_adds_up_the_host_memory_level_1_sleepers_need() -> None:
    from backends.placement import sleeper_memory

    specs = [spec("qwen-7b", (0,), 0.6), spec("llama-70b", (1,), 0.9), spec("embed", (0,), 0.1)]
    line, warning = sleeper_memory(specs, {"qwen-7b", "llama-70b"}, host_bytes=128e9)
    assert line == ("level-1 sleepers keep ~154 GB of weights in host memory; this host has 128 GB")
    assert warning is not None and "use sleep_level 2 for some" in warning
    assert sleeper_memory(specs, {"qwen-7b"}, host_bytes=128e9)[1] is None
    assert sleeper_memory(specs, set(), host_bytes=128e9) == (None, None)
