"""Images and audio through the gateway, against real vLLM CPU servers.

Vision: a tiny BLIP-2 in connect mode (the rig starts it in the discovery pod's place), compared
with the same server called directly. Audio: a tiny Whisper that the rig's `speech` gateway
spawns, with vLLM's own upload limit (1 MiB here) below the gateway's body limit (2 MiB), so each
limit is seen answering. Clients are the OpenAI SDK and raw httpx.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.commands.tiny_media import png, wav
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS, SPEECH_MAX_BODY, VllmRig

pytestmark = pytest.mark.vllm
KEY = "sk-media"
SPEECH_KEY = "sk-spawn"
PROMPT = "what is in the picture?"


def image_part(picture: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(picture).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def look(*pictures: bytes, **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": PROMPT}, *map(image_part, pictures)]
    return {
        "model": "tiny-vision",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def noise_png(side: int) -> bytes:
    """A picture PNG cannot compress: its size is about 3 bytes a pixel."""
    from PIL import Image

    pixels = random.Random(side).randbytes(side * side * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(out, format="PNG")
    return out.getvalue()


NEAR = noise_png(150)  # a request of about 90 kB
VISION_MAX_BODY = len(json.dumps(look(NEAR))) + 512


@pytest.fixture(scope="module")
def vision(rig: VllmRig) -> Iterator[str]:
    try:
        yield rig.vision()
    finally:
        rig.stop_vision()  # its place goes to the on-demand tests' servers


@pytest.fixture(scope="module")
def gw(vision: str) -> Iterator[GatewayProcess]:
    models = [{"name": "tiny-vision", "aliases": ["blip"], "url": vision}]
    config = {"models": models, "api_keys": [KEY], "max_body_bytes": VISION_MAX_BODY}
    server = GatewayProcess(config, ARTIFACTS)
    yield server
    server.close()


def post(url: str, body: dict[str, Any], key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def relayed_chats(rig: VllmRig) -> int:
    """Chat requests the vision server received, from its own access log."""
    log = rig.late["vision"].log.read_text(errors="replace")
    return log.count('"POST /v1/chat/completions HTTP/1.1"')


def test_a_chat_with_an_image_equals_vllm_direct(gw: GatewayProcess, vision: str) -> None:
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
    for seed in (0, 2):
        body = look(png(seed=seed))
        via = sdk.chat.completions.create(**body)
        assert via.choices[0].message.content == answer(post(vision, body, key=None))
        assert via.model == "tiny-vision"
    # The picture reaches the model: two pictures, two answers (greedy, same prompt).
    assert answer(post(gw.url, look(png(seed=0)))) != answer(post(gw.url, look(png(seed=2))))


def test_an_image_streams_as_vllm_streams_it(gw: GatewayProcess, vision: str) -> None:
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
    chunks = list(sdk.chat.completions.create(**look(png(seed=1)), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == answer(post(vision, look(png(seed=1)), key=None))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_an_image_near_the_body_limit_passes_one_over_it_never_reaches_vllm(
    gw: GatewayProcess, rig: VllmRig
) -> None:
    assert answer(post(gw.url, look(NEAR)))
    before = relayed_chats(rig)
    over = post(gw.url, look(noise_png(160)))
    assert over.status_code == 413
    assert over.json()["error"]["type"] == "invalid_request_error"
    assert relayed_chats(rig) == before


def test_two_images_where_the_model_takes_one_get_vllms_own_400(
    gw: GatewayProcess, vision: str
) -> None:
    body = look(png(seed=0), png(seed=1))
    via, direct = post(gw.url, body), post(vision, body, key=None)
    assert via.status_code == direct.status_code == 400
    assert via.json() == direct.json()
    assert "image" in via.json()["error"]["message"]


@pytest.fixture(scope="module")
def speech(rig: VllmRig) -> openai.OpenAI:
    """The spawn-mode gateway in front of the tiny Whisper (its `whisper-1` alias is the name
    OpenAI's examples use)."""
    return openai.OpenAI(
        base_url=f"{rig.spawned['speech'].url}/v1", api_key=SPEECH_KEY, max_retries=0, timeout=120
    )


def test_sdk_transcribes_and_translates_through_the_gateway(speech: openai.OpenAI) -> None:
    upload = ("tone.wav", wav(), "audio/wav")
    text = speech.audio.transcriptions.create(model="whisper-1", file=upload, language="en")
    assert text.text.strip()
    again = speech.audio.transcriptions.create(model="tiny-whisper", file=upload, language="en")
    assert again.text == text.text  # greedy by default: the alias reached the same model
    translated = speech.audio.translations.create(model="whisper-1", file=upload)
    assert translated.text.strip()


def test_a_transcription_streams_its_chunks(speech: openai.OpenAI) -> None:
    upload = ("tone.wav", wav(), "audio/wav")
    events = list(
        speech.audio.transcriptions.create(
            model="whisper-1", file=upload, language="en", stream=True
        )
    )
    assert len(events) > 1 and {e.object for e in events} == {"transcription.chunk"}  # type: ignore[union-attr]
    streamed = "".join(e.choices[0]["delta"]["content"] for e in events)  # type: ignore[union-attr]
    whole = speech.audio.transcriptions.create(model="whisper-1", file=upload, language="en")
    assert streamed == whole.text


def test_each_upload_limit_answers_for_its_own_size(rig: VllmRig) -> None:
    """vLLM refuses audio over VLLM_MAX_AUDIO_CLIP_FILESIZE_MB itself (its 400 passes through);
    a body over the gateway's limit gets the gateway's 413 and never reaches vLLM."""
    url = f"{rig.spawned['speech'].url}/v1/audio/transcriptions"
    auth = {"Authorization": f"Bearer {SPEECH_KEY}"}
    form = {"model": "whisper-1", "language": "en"}

    def upload(seconds: float) -> httpx.Response:
        files = {"file": ("long.wav", wav(seconds), "audio/wav")}
        return httpx.post(url, data=form, files=files, headers=auth, timeout=120)

    past_vllm = upload(40)  # 1.2 MiB: over vLLM's 1 MiB, under the gateway's 2 MiB
    assert past_vllm.status_code == 400
    assert "file size" in past_vllm.json()["error"]["message"]
    past_gateway = upload(SPEECH_MAX_BODY / 32000 + 5)
    assert past_gateway.status_code == 413
    assert past_gateway.json()["error"]["type"] == "invalid_request_error"


def test_an_upload_without_a_model_field_is_a_400_naming_it(rig: VllmRig) -> None:
    files = {"file": ("tone.wav", wav(), "audio/wav")}
    response = httpx.post(
        f"{rig.spawned['speech'].url}/v1/audio/transcriptions",
        files=files,
        headers={"Authorization": f"Bearer {SPEECH_KEY}"},
        timeout=60,
    )
    assert response.status_code == 400
    assert "model" in response.json()["error"]["message"]
