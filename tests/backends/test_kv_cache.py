"""What a slice should give a model's KV cache, and what vLLM says it got: pure arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

from backends import kv_cache
from backends.kv_cache import GiB, KvCache
from backends.spec import VllmSpec

# A Qwen2-7B body: 28 layers x 4 KV heads x 128 x 2 (K and V) x 2 bytes = 56 KiB a token.
QWEN_7B = {
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_size": 3584,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 32768,
}


def model(tmp_path: Path, weights_gib: float = 12.0, **config: object) -> str:
    path = tmp_path / "m"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**QWEN_7B, **config}))
    index = {"metadata": {"total_size": int(weights_gib * GiB)}, "weight_map": {}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(path)


def spec(path: str, gpus: tuple[int, ...] = (0,), **args: object) -> VllmSpec:
    return VllmSpec(name="chat", model=path, gpus=gpus, args=args)


def test_bytes_per_token_follow_the_config_and_the_cache_dtype(tmp_path: Path) -> None:
    path = model(tmp_path)
    assert kv_cache.bytes_per_token(spec(path)) == 56 * 1024
    assert kv_cache.bytes_per_token(spec(path, **{"kv-cache-dtype": "fp8"})) == 28 * 1024
    assert kv_cache.bytes_per_token(spec(path, dtype="float32")) == 112 * 1024
    assert kv_cache.bytes_per_token(spec(str(tmp_path / "absent"))) is None


def test_a_gpu_slice_leaves_share_times_memory_less_weights_and_overhead(tmp_path: Path) -> None:
    path = model(tmp_path, weights_gib=12.0)
    expected = kv_cache.expected_bytes(spec(path, **{"gpu-memory-utilization": 0.3}), 140 * GiB)
    assert expected == (0.3 * 140 - 12 - kv_cache.OVERHEAD_GIB) * GiB
    # Unknown GPU memory or an explicit cache size:
    assert kv_cache.expected_bytes(spec(path), None) is None
    explicit = spec(path, **{"kv-cache-memory-bytes": "8G"})
    assert kv_cache.expected_bytes(explicit, None) == 8 * GiB


def test_the_cpu_build_gets_what_vllm_cpu_kvcache_space_says(tmp_path: Path) -> None:
    cpu = VllmSpec(name="c", model=model(tmp_path), env={"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert kv_cache.expected_bytes(cpu, None) == 4 * GiB


def test_tokens_come_from_vllms_cache_config_series() -> None:
    newer = 'vllm:cache_config_info{block_size="128",kv_cache_size_tokens="524288"} 1.0\n'
    older = 'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="4096"} 1.0\n'
    assert kv_cache.tokens_from_metrics("# HELP x\n" + newer) == 524288
    assert kv_cache.tokens_from_metrics(older) == 65536
    assert kv_cache.tokens_from_metrics('vllm:num_requests_running{a="b"} 0\n') is None


def test_a_cache_under_half_of_its_share_is_short() -> None:
    assert KvCache(expected_bytes=100.0, actual_tokens=49, bytes_per_token=1.0).short
    assert not KvCache(expected_bytes=100.0, actual_tokens=50, bytes_per_token=1.0).short
    assert not KvCache(expected_bytes=None, actual_tokens=1, bytes_per_token=1.0).short


def test_plan_shows_the_arithmetic_and_warns_when_one_sequence_does_not_fit(
    tmp_path: Path,
) -> None:
    path = model(tmp_path, weights_gib=12.0)
    line, warning = kv_cache.plan(spec(path, **{"gpu-memory-utilization": 0.3}), 140 * GiB)
    assert line == (
        "kv cache: 0.3 x 140.0 GiB x 1 GPU - 12.0 GiB weights (safetensors index)"
        " - 2 GiB overhead = 28.0 GiB = 524,288 tokens (16.0 x max-model-len 32,768)"
    )
    assert warning is None
    # 0.1 of 140 GiB is 14 GiB: the weights and the overhead leave nothing.
    _, warning = kv_cache.plan(spec(path, **{"gpu-memory-utilization": 0.1}), 140 * GiB)
    assert warning is not None and "cannot hold one sequence of max-model-len 32768" in warning
    line, _ = kv_cache.plan(spec(path), None)
    assert line.startswith("kv cache: unknown: GPU memory unknown")
