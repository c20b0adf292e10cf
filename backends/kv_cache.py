"""How much KV cache a generative server should get from its slice, and how much it got.

Expected: on a GPU, ``share x GPU memory x GPUs - weights - OVERHEAD_GIB x GPUs``; on vLLM's
CPU build, ``VLLM_CPU_KVCACHE_SPACE`` GiB; ``kv-cache-memory-bytes`` where it is set. Actual:
the server's own ``vllm:cache_config_info`` series (its KV cache size in tokens, or GPU blocks
x block size). Bytes and tokens convert through the model's config.json (layers x KV heads x
head size x 2 for K and V x bytes per value), so both are known wherever the model is a local
directory. Pooling models (embedders, rerankers) keep no KV cache and are skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.placement import weight_bytes
from backends.spec import VllmSpec

GiB = float(2**30)
# Per GPU, what vLLM uses besides weights and KV cache within its share: the CUDA context,
# the activation peak of its profiling run and NCCL/cuBLAS workspaces. Measured with
# --enforce-eager (docs/operations.md, "GPU slices that hold"); CUDA graphs add to it.
OVERHEAD_GIB = 2.0
SHORT_FRACTION = 0.5  # below this fraction of the expected cache, the gateway warns


@dataclass(frozen=True, slots=True)
class KvCache:
    expected_bytes: float | None = None
    actual_tokens: int | None = None
    bytes_per_token: float | None = None

    @property
    def expected_tokens(self) -> int | None:
        if self.expected_bytes is None or not self.bytes_per_token:
            return None
        return max(0, int(self.expected_bytes / self.bytes_per_token))

    @property
    def actual_bytes(self) -> float | None:
        if self.actual_tokens is None or not self.bytes_per_token:
            return None
        return self.actual_tokens * self.bytes_per_token

    @property
    def short(self) -> bool:
        """Got less than half of what its slice should give."""
        expected, actual = self.expected_tokens, self.actual_tokens
        return expected is not None and actual is not None and actual < SHORT_FRACTION * expected

    def describe(self) -> str:
        return f"expected {_amount(self.expected_bytes, self.expected_tokens)}, " + (
            f"got {_amount(self.actual_bytes, self.actual_tokens)}"
        )


def _amount(size: float | None, tokens: int | None) -> str:
    gib = "? GiB" if size is None else f"{size / GiB:.2f} GiB"
    return gib + (f" ({tokens:,} tokens)" if tokens is not None else "")


def generative(spec: VllmSpec) -> bool:
    runner = str(spec.args.get("runner", "")).lower()
    return runner != "pooling" and "convert" not in spec.args and "task" not in spec.args


def model_config(spec: VllmSpec) -> dict[str, Any] | None:
    path = Path(spec.model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config")  # vision-language models keep the LM's shape here
    return {**config, **text} if isinstance(text, dict) else config


def bytes_per_token(spec: VllmSpec) -> float | None:
    config = model_config(spec)
    if config is None:
        return None
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return 2.0 * layers * kv_heads * head_dim * _value_bytes(spec, config)


def _value_bytes(spec: VllmSpec, config: dict[str, Any]) -> float:
    cache_dtype = str(spec.args.get("kv-cache-dtype", "auto")).lower()
    if cache_dtype.startswith("fp8"):
        return 1.0
    dtype = str(spec.args.get("dtype", "auto")).lower()
    if dtype == "auto":
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").lower()
    return 4.0 if dtype in ("float32", "float") else 2.0


def expected_bytes(spec: VllmSpec, gpu_memory: float | None) -> float | None:
    """What the slice should leave for the KV cache; None where that cannot be known."""
    explicit = spec.args.get("kv-cache-memory-bytes")
    if explicit is not None:
        return _size(explicit)
    if not spec.gpus:
        space = spec.environment().get("VLLM_CPU_KVCACHE_SPACE", "")
        return float(space) * GiB if space.strip().isdigit() else None
    weights = weight_bytes(spec)
    if gpu_memory is None or weights is None:
        return None
    gpus = len(spec.gpus)
    return spec.memory_share * gpu_memory * gpus - weights[0] - OVERHEAD_GIB * GiB * gpus


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def _size(value: object) -> float | None:
    """vLLM's size strings: 1000, '20G', '8GiB', '512M'."""
    match = _SIZE.match(str(value))
    if match is None:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return float(match.group(1)) * scale


_INFO = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def tokens_from_metrics(text: str) -> int | None:
    """The KV cache size in tokens from a vLLM server's /metrics text."""
    match = _INFO.search(text)
    if match is None:
        return None
    labels = dict(_LABEL.findall(match.group("labels")))
    if labels.get("kv_cache_size_tokens", "").isdigit():
        return int(labels["kv_cache_size_tokens"])
    blocks, block_size = labels.get("num_gpu_blocks", ""), labels.get("block_size", "")
    if blocks.isdigit() and block_size.isdigit():
        return int(blocks) * int(block_size)
    return None


def max_model_len(spec: VllmSpec) -> int | None:
    explicit = spec.args.get("max-model-len")
    if explicit is not None:
        return int(_size(explicit) or 0) or None
    config = model_config(spec) or {}
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def plan(spec: VllmSpec, gpu_memory: float | None) -> tuple[str, str | None]:
    """`vllm-gateway plan`'s KV cache line for a generative model, and a warning if its cache
    cannot hold one sequence of max-model-len."""
    weights = weight_bytes(spec)
    size = expected_bytes(spec, gpu_memory)
    per_token = bytes_per_token(spec)
    if "kv-cache-memory-bytes" in spec.args:
        how = f"kv-cache-memory-bytes {spec.args['kv-cache-memory-bytes']}"
    elif not spec.gpus:
        how = "VLLM_CPU_KVCACHE_SPACE (CPU build)" if size is not None else ""
    elif gpu_memory is None:
        how = "GPU memory unknown (set gpu_memory_gib, or run where nvidia-smi answers)"
    elif weights is None:
        how = "weights unknown (not a local model directory, no size in the name)"
    else:
        how = (
            f"{spec.memory_share:g} x {gpu_memory / GiB:.1f} GiB x {len(spec.gpus)} GPU"
            f" - {weights[0] / GiB:.1f} GiB weights ({weights[1]})"
            f" - {OVERHEAD_GIB * len(spec.gpus):g} GiB overhead"
        )
    if size is None:
        return f"kv cache: unknown{': ' + how if how else ''}", None
    line = f"kv cache: {how} = {size / GiB:.1f} GiB"
    tokens = int(size / per_token) if per_token and size > 0 else None
    longest = max_model_len(spec)
    if tokens is not None:
        line += f" = {tokens:,} tokens"
        if longest:
            line += f" ({tokens / longest:.1f} x max-model-len {longest:,})"
    if size <= 0 or (tokens is not None and longest and tokens < longest):
        return line, (
            f"{spec.label}: its KV cache ({max(size, 0) / GiB:.1f} GiB) cannot hold one "
            f"sequence of max-model-len {longest or '?'}; raise gpu-memory-utilization or "
            "lower max-model-len"
        )
    return line, None
