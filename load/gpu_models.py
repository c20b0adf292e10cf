"""A realistic-size random-weight model, built on the GPU machine itself in seconds.

Tiny models hide what only size shows: weight memory, the KV cache left in a slice, load and
wake times. Only this script travels; the weights are drawn on the GPU and written as
safetensors shards with an index (whose total size `vllm-gateway plan` reads).

    python3 load/gpu_models.py OUT_DIR --tokenizer-from TINY_CHAT_DIR

The shape is Qwen2-7B's body (28 layers, hidden 3584, 28 heads, 4 KV heads, MLP 18944) with the
tiny chat model's 2,048-token vocabulary, so every id it samples decodes: about 13 GB in bf16.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 2048,
    "max_position_embeddings": 32768,
}
SHARD_BYTES = 4 * 2**30


def tensors(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        names += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return [*names, ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build(out: Path, tokenizer_from: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((tokenizer_from / "config.json").read_text())
    config.update(SHAPE, torch_dtype="bfloat16", dtype="bfloat16", tie_word_embeddings=False)
    config.pop("layer_types", None)  # the tiny model's list has its own layer count
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in tokenizer_from.iterdir():
        if file.name != "config.json" and not file.name.startswith("model"):
            shutil.copy(file, out / file.name)
    generator = torch.Generator(device="cuda").manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total = size = 0

    def flush() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))

    for name, shape in tensors(SHAPE):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
            tensor.normal_(0.0, 0.02, generator=generator)
            tensor = tensor.cpu()
        if shard and size + tensor.nbytes > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, required=True)
    args = parser.parse_args()
    began = time.monotonic()
    total = build(args.out, args.tokenizer_from)
    print(f"{args.out}: {total / 2**30:.1f} GiB of weights in {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
