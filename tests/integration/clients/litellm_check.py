"""LiteLLM as a client library against the gateway, in the clients' own environment
(.venv-clients). Prints one JSON document.

    LITELLM_LOCAL_MODEL_COST_MAP=True python litellm_check.py GATEWAY_URL KEY
"""

from __future__ import annotations

import json
import sys

import litellm


def main(url: str, key: str) -> None:
    common = {"api_base": f"{url}/v1", "api_key": key, "num_retries": 0}
    hello = [{"role": "user", "content": "hello there"}]
    chat = litellm.completion(
        model="openai/tiny-chat", messages=hello, max_tokens=8, temperature=0, **common
    )
    stream = litellm.completion(
        model="openai/tiny-chat",
        messages=hello,
        max_tokens=8,
        temperature=0,
        stream=True,
        **common,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    embedded = litellm.embedding(
        model="openai/tiny-embed", input=["a cat sat on the mat", "stock prices fell"], **common
    )
    try:
        litellm.completion(model="openai/no-such-model", messages=hello, max_tokens=8, **common)
        missing = "no error"
    except litellm.NotFoundError as exc:
        missing = f"NotFoundError {exc.status_code}"
    print(
        json.dumps(
            {
                "chat": chat.choices[0].message.content,
                "usage": chat.usage.completion_tokens,
                "streamed": streamed,
                "vectors": [d["embedding"] for d in embedded.data],
                "missing": missing,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
