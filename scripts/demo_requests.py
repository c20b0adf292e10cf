"""Wait for the demo gateway's models, then show a chat, a stream, embeddings, a rerank, a chat
with an image and a transcription."""

from __future__ import annotations

import base64
import sys
import time

import httpx
import openai

from gateway.commands.tiny_media import png, wav

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
models = ["tiny-chat", "tiny-embed", "tiny-rerank"]  # tiny-reasoner starts on demand, below

PROBES = {
    "tiny-chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    "tiny-embed": ("/v1/embeddings", {"input": "x"}),
    "tiny-rerank": ("/v1/rerank", {"query": "x", "documents": ["y"]}),
}


def answers(model: str) -> bool:
    path, body = PROBES[model]
    try:
        response = httpx.post(f"{base}{path}", json={"model": model, **body}, timeout=30)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


print("waiting for the three always-on vLLM servers (about a minute on a CPU)...", flush=True)
deadline = time.monotonic() + 900
pending = set(models)
while pending and time.monotonic() < deadline:
    for model in sorted(pending):
        if answers(model):
            pending.discard(model)
            print(f"  {model}: ready", flush=True)
    time.sleep(2)
if pending:
    sys.exit(f"not ready: {sorted(pending)}")

print("\nGET /v1/models:", [m.id for m in client.models.list().data])

chat = client.chat.completions.create(
    model="chat", messages=[{"role": "user", "content": "Hello!"}], max_tokens=12, temperature=0
)
print(f"\nchat (alias 'chat' -> {chat.model}): {chat.choices[0].message.content!r}")
print("  (random weights: the words are nonsense, the protocol is vLLM's own)")

print("\ntiny-reasoner is on demand: its first request starts its server and waits for it...")
first = httpx.post(
    f"{base}/v1/chat/completions",
    json={"model": "tiny-reasoner", "messages": [{"role": "user", "content": "x"}]},
    timeout=600,
)
waited = first.headers.get("x-vllm-gateway-start-wait", "0")
print(f"  {first.status_code} after a start of {float(waited):.0f}s (x-vllm-gateway-start-wait)")

print("\nstream from tiny-reasoner (deepseek_r1 parser puts text in `reasoning`):")
for chunk in client.chat.completions.create(
    model="tiny-reasoner",
    messages=[{"role": "user", "content": "Think."}],
    max_tokens=8,
    stream=True,
):
    if chunk.choices:
        delta = chunk.choices[0].delta
        reasoning = (delta.model_extra or {}).get("reasoning")
        print(f"  event: reasoning={reasoning!r} content={delta.content!r}")

emb = client.embeddings.create(model="tiny-embed", input=["a gateway", "in front of vLLM"])
print(
    f"\nembeddings: {len(emb.data)} vectors of {len(emb.data[0].embedding)} floats, "
    f"first values {[round(x, 4) for x in emb.data[0].embedding[:4]]}"
)

rerank = httpx.post(
    f"{base}/v1/rerank",
    json={
        "model": "rerank",
        "query": "where is the cat?",
        "documents": ["the cat sat on the mat", "paris is a city", "dogs run fast"],
    },
).json()
print("\nrerank:")
for result in rerank["results"]:
    print(f"  {result['relevance_score']:.4f}  {result['document']['text']}")

print("\ntiny-vision and tiny-whisper are on demand too (each starts on its first request)...")
picture = "data:image/png;base64," + base64.b64encode(png()).decode()
seen = client.with_options(timeout=600).chat.completions.create(
    model="tiny-vision",
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_url", "image_url": {"url": picture}},
            ],
        }
    ],
    max_tokens=8,
    temperature=0,
)
print(f"  chat with a {len(png())}-byte PNG: {seen.choices[0].message.content!r}")
heard = client.with_options(timeout=600).audio.transcriptions.create(
    model="whisper-1", file=("tone.wav", wav(), "audio/wav"), language="en"
)
print(f"  transcription of a one-second tone: {heard.text[:60]!r}...")
