"""LlamaIndex's OpenAI-like classes against the gateway, run in the clients' own environment
(.venv-clients: LlamaIndex pins an older `openai` than vLLM). Prints one JSON document.

    python llamaindex_check.py GATEWAY_URL KEY
"""

from __future__ import annotations

import json
import sys

from llama_index.core.llms import ChatMessage
from llama_index.embeddings.openai_like import OpenAILikeEmbedding
from llama_index.llms.openai_like import OpenAILike


def main(url: str, key: str) -> None:
    llm = OpenAILike(
        model="tiny-chat",
        api_base=f"{url}/v1",
        api_key=key,
        is_chat_model=True,
        max_tokens=8,
        temperature=0,
        max_retries=0,
    )
    hello = [ChatMessage(role="user", content="hello there")]
    chat = llm.chat(hello)
    streamed = "".join(part.delta or "" for part in llm.stream_chat(hello))
    embedder = OpenAILikeEmbedding(
        model_name="tiny-embed", api_base=f"{url}/v1", api_key=key, max_retries=0
    )
    vectors = embedder.get_text_embedding_batch(["a cat sat on the mat", "stock prices fell"])
    print(
        json.dumps(
            {
                "chat": chat.message.content,
                "streamed": streamed,
                "vectors": vectors,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
