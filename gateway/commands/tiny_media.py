"""Tiny random-weight vision and speech models that vLLM's CPU build serves.

    vision/    BLIP-2 (OPT text model, one-layer vision tower, 28-pixel images, 4 query tokens):
               chat with one `image_url` part. Qwen2-VL and LLaVA would need torchvision, which
               does not import next to the CPU torch.
    audio/     Whisper (one encoder and one decoder layer, 80 mel bins): /v1/audio/transcriptions
               and /translations; vLLM decodes 16 kHz WAV with `soundfile`.

Also the inputs the tests and the demo send them: a PNG and a WAV made here, no files shipped.
"""

# transformers' constructors are untyped: checking calls into them adds nothing here.
# mypy: disable-error-code="no-untyped-call,call-arg,arg-type,attr-defined"
from __future__ import annotations

import io
import math
import struct
import wave
from pathlib import Path
from typing import Any

from gateway.commands.tiny_models import HEADS, HIDDEN, VOCAB_SIZE, byte_bpe, save_model

IMAGE_SIZE = 28
QUERY_TOKENS = 4
SAMPLE_RATE = 16_000  # the only rate vLLM decodes without PyAV
VISION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['role'] + ': ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ message['role'] + ': ' + part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def build_vision(target: Path) -> None:
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
        GPT2TokenizerFast,
    )

    tokenizer = GPT2TokenizerFast(
        tokenizer_object=byte_bpe(["</s>", "<pad>", "<image>"], VOCAB_SIZE, seed=3),
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = VISION_TEMPLATE
    images = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(images, tokenizer, num_query_tokens=QUERY_TOKENS)
    processor.chat_template = VISION_TEMPLATE

    torch.manual_seed(4)
    small = {"num_hidden_layers": 1, "num_attention_heads": HEADS, "intermediate_size": 2 * HIDDEN}
    config = Blip2Config(
        vision_config={**small, "hidden_size": HIDDEN, "image_size": IMAGE_SIZE, "patch_size": 14},
        qformer_config={**small, "hidden_size": HIDDEN, "encoder_hidden_size": HIDDEN},
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": HIDDEN,
            "word_embed_proj_dim": HIDDEN,
            "ffn_dim": 2 * HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": HEADS,
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.dtype = "float32"
    model = Blip2ForConditionalGeneration(config)
    _silence(model.get_input_embeddings().weight, tokenizer)
    save_model(model, processor, target)


def whisper_specials() -> list[str]:
    """Whisper's special, language and task tokens, in the order its tokenizer has them."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    languages = [f"<|{code}|>" for code in LANGUAGES]
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *languages,
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|prev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *(f"<|{i * 0.02:.2f}|>" for i in range(1501)),
    ]


def build_audio(target: Path) -> None:
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    specials = whisper_specials()
    words = byte_bpe(["<|endoftext|>"], VOCAB_SIZE, seed=3)
    words.add_special_tokens(specials)  # its constructor looks them up
    tokenizer = WhisperTokenizerFast(
        tokenizer_object=words,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})  # marked special
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE)
    processor = WhisperProcessor(features, tokenizer)

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    torch.manual_seed(5)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=HIDDEN,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=2 * HIDDEN,
        decoder_ffn_dim=2 * HIDDEN,
        max_source_positions=1500,  # vLLM pads every clip to 30 s
        max_target_positions=128,  # Whisper's 448 would make each test transcription longer
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
        dtype="float32",
    )
    model = WhisperForConditionalGeneration(config)
    _silence(model.get_decoder().embed_tokens.weight, tokenizer)
    save_model(model, processor, target)


def _silence(embeddings: Any, tokenizer: Any) -> None:
    """Zero the (tied) embeddings of every token that is not text on its own: special tokens
    and stray bytes of UTF-8 sequences. Random ones outscore the words, and a random model that
    emits them answers nothing a test can compare."""
    import torch

    def is_text(token: str) -> bool:
        return token.isascii() and token.strip() != "" and token.isprintable()

    rows = range(embeddings.shape[0])  # ids past the tokenizer's decode to nothing
    silent = [i for i in rows if not is_text(tokenizer.decode([i], skip_special_tokens=True))]
    with torch.no_grad():
        embeddings[silent] = 0


def png(size: int = IMAGE_SIZE, seed: int = 0) -> bytes:
    """A small RGB picture: stripes whose colours follow ``seed``."""
    from PIL import Image

    image = Image.new("RGB", (size, size))
    for x in range(size):
        for y in range(size):
            image.putpixel((x, y), ((x * 9 + seed * 40) % 256, (y * 9) % 256, (seed * 70) % 256))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def wav(seconds: float = 1.0, hz: float = 440.0) -> bytes:
    """A 16 kHz mono 16-bit sine tone."""
    frames = int(seconds * SAMPLE_RATE)
    samples = (int(12000 * math.sin(2 * math.pi * hz * i / SAMPLE_RATE)) for i in range(frames))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(struct.pack(f"<{frames}h", *samples))
    return out.getvalue()
