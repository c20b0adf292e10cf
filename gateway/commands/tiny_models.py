"""Tiny random-weight models that real vLLM serves on a CPU, built here in seconds.

No model can be downloaded in CI, yet the tests and the demo must talk to real vLLM servers.
These models are deterministic (fixed seeds), small (a few MB) and shaped as vLLM's CPU build
needs (head_dim 64). Their answers are nonsense; their wire format is exactly vLLM's.

    chat/      Qwen2 causal LM with a ChatML template and <think> / </think> tokens
    embed/     BERT encoder (served with --runner pooling)
    rerank/    BERT cross-encoder with one label (score and rerank)
    lora/      a rank-8 LoRA adapter of chat/ (q_proj and v_proj), non-zero: its answers differ
    vision/    BLIP-2 (chat with an image), audio/ Whisper (transcriptions): see tiny_media.py

Needs torch, transformers and tokenizers: the `cpu` extra of this project brings them.
"""

# transformers' constructors are untyped: checking calls into them adds nothing here.
# mypy: disable-error-code="no-untyped-call,call-arg,arg-type,attr-defined"
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

VOCAB_SIZE = 2048
HIDDEN = 128
HEADS = 2  # head_dim = 64: vLLM's CPU attention needs 32 or more
KINDS = ("chat", "embed", "rerank", "lora", "vision", "audio")
LORA_RANK = 8
SENTENCE_TRANSFORMERS = "config_sentence_transformers.json"  # an embedder's input-type prompts

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = """
the a model server gateway request token stream vector query document answer question
fast slow small large cat dog river mountain city light dark red blue green time day
night is are was be have has do make take see know think say give find tell ask work
seem feel and or but if then because when where while with without into over under
between through one two three four five hundred first last next every some many few
all none more less paris london tokyo berlin rome data code test build ship deploy
scale cache memory gpu cpu hello world please thanks sorry yes no maybe what why how
who which this that these those
""".split()


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return out


def build_all(out_dir: str | Path, kinds: tuple[str, ...] = KINDS) -> dict[str, Path]:
    """Build (or reuse) each kind under ``out_dir``; returns kind -> model directory."""
    from gateway.commands.tiny_media import build_audio, build_vision  # they import this module

    out = Path(out_dir)
    builders = {
        "chat": build_chat,
        "embed": build_embedder,
        "rerank": build_reranker,
        "lora": build_lora,
        "vision": build_vision,
        "audio": build_audio,
    }
    built = {}
    for kind in kinds:
        target = out / kind
        done: tuple[str, ...] = ("config.json", "tokenizer.json")
        if kind == "lora":
            done = ("adapter_config.json",)
        elif kind == "embed":
            done += (SENTENCE_TRANSFORMERS,)
        elif kind in ("vision", "audio"):
            done += ("processor_config.json",)
        if not all((target / name).exists() for name in done):
            builders[kind](target)
        built[kind] = target
    return built


def build_lora(target: Path) -> None:
    """A LoRA adapter for chat/: random, non-zero A and B, so greedy output differs from the
    base model's (a zero B would change nothing)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, HIDDEN) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, LORA_RANK) * 0.5
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": 2 * LORA_RANK,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "chat",
    }
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))


def byte_bpe(specials: list[str], vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer (GPT-2's kind) trained on ``corpus(seed=seed)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer)
    return tok


def build_chat(target: Path) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_bpe(specials, VOCAB_SIZE - 8),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.add_tokens(["<think>", "</think>"])  # what deepseek_r1's reasoning parser looks for
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        dtype="float32",
    )
    save_model(Qwen2ForCausalLM(config), tokenizer, target)


def _bert_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        corpus(seed=1),
        trainers.WordPieceTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False
        ),
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)


def _bert_config(tokenizer: Any, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **extra,
    )


def build_embedder(target: Path) -> None:
    """With input-type prompts, as e5-style models ship them: vLLM serves Cohere's
    `input_type` only for a model that defines them."""
    import torch
    from transformers import BertModel

    tokenizer = _bert_tokenizer()
    torch.manual_seed(1)
    save_model(BertModel(_bert_config(tokenizer), add_pooling_layer=False), tokenizer, target)
    prompts = {"search_query": "query: ", "search_document": "passage: "}
    (target / SENTENCE_TRANSFORMERS).write_text(json.dumps({"prompts": prompts}) + "\n")


def build_reranker(target: Path) -> None:
    import torch
    from transformers import BertForSequenceClassification

    tokenizer = _bert_tokenizer()
    torch.manual_seed(2)
    config = _bert_config(tokenizer, num_labels=1, id2label={0: "LABEL_0"})
    save_model(BertForSequenceClassification(config), tokenizer, target)


def save_model(model: Any, tokenizer: Any, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "tiny-model.json").write_text(
        json.dumps({"built_by": "vllm-gateway tiny-models", "random_weights": True}) + "\n"
    )
