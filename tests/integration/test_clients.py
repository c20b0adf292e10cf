"""Client libraries people use, unchanged, pointed at the gateway: Anthropic's SDK, Cohere's
(v2 and v1), LangChain's OpenAI integration; LlamaIndex's OpenAI-like classes and LiteLLM in an
environment of their own (they pin an older `openai` than vLLM). The OpenAI SDK has
test_endpoints.py.

Each is configured as its documentation says for a self-hosted base URL and nothing else; what a
library gets wrong against vLLM itself is written down in docs/clients.md, not worked around here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import anthropic
import cohere
import httpx
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from tests.integration.conftest import KEY
from tests.servers import ROOT, GatewayProcess

pytestmark = pytest.mark.vllm
HELLO = [{"role": "user", "content": "hello there"}]
CLIENTS = Path(__file__).parent / "clients"
DOCUMENTS = ["a cat sat on the mat", "stock prices fell today", "the kitten slept"]


@pytest.fixture(scope="module")
def claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0)


def test_anthropic_messages_with_usage(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="tiny-chat", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 8


def test_anthropic_stream_ends_with_the_final_message(claude: anthropic.Anthropic) -> None:
    # Greedy: a sampled answer of the random model can be 8 tokens that make no text block.
    with claude.messages.stream(
        model="tiny-chat",
        max_tokens=8,
        messages=HELLO,  # type: ignore[arg-type]
        extra_body={"temperature": 0},  # this SDK's stream() takes no temperature argument
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == 8


def test_anthropic_counts_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="tiny-chat", messages=HELLO)  # type: ignore[arg-type]
    created = claude.messages.create(model="tiny-chat", max_tokens=1, messages=HELLO)  # type: ignore[arg-type]
    assert counted.input_tokens == created.usage.input_tokens > 0


def test_anthropic_errors_are_its_own_exceptions(
    gateway: GatewayProcess, claude: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    stranger = anthropic.Anthropic(base_url=gateway.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="tiny-chat", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cohere_v2(gateway: GatewayProcess) -> cohere.ClientV2:
    return cohere.ClientV2(api_key=KEY, base_url=gateway.url)


def test_cohere_v2_rerank_matches_vllm_direct(
    cohere_v2: cohere.ClientV2, vllm: dict[str, str]
) -> None:
    ranked = cohere_v2.rerank(model="tiny-rerank", query="cats", documents=DOCUMENTS)
    direct = cohere.ClientV2(api_key="unused", base_url=vllm["tiny-rerank"]).rerank(
        model="tiny-rerank", query="cats", documents=DOCUMENTS
    )
    assert [r.index for r in ranked.results] == [r.index for r in direct.results]
    assert sorted(r.index for r in ranked.results) == [0, 1, 2]
    scores = [r.relevance_score for r in ranked.results]
    assert scores == sorted(scores, reverse=True)


def test_cohere_v2_embed_floats_per_input_type(cohere_v2: cohere.ClientV2) -> None:
    """The tiny embedder defines input-type prompts; vLLM refuses `input_type` for a model
    that does not (its 400 passes through unchanged; see docs/clients.md)."""

    def embed(input_type: str) -> list[list[float]]:
        answer = cohere_v2.embed(
            model="tiny-embed",
            texts=DOCUMENTS,
            input_type=input_type,  # type: ignore[arg-type]
            embedding_types=["float"],
        )
        assert answer.embeddings.float_ is not None
        return answer.embeddings.float_

    documents, queries = embed("search_document"), embed("search_query")
    assert len(documents) == 3 and len({len(v) for v in documents}) == 1
    assert documents != queries  # each input type gets its own prompt


def test_cohere_v1_rerank(gateway: GatewayProcess) -> None:
    v1 = cohere.Client(api_key=KEY, base_url=gateway.url)
    ranked = v1.rerank(model="tiny-rerank", query="cats", documents=DOCUMENTS)
    assert sorted(r.index for r in ranked.results) == [0, 1, 2]


def test_langchain_chat_invoke_and_stream(gateway: GatewayProcess) -> None:
    chat = ChatOpenAI(
        model="tiny-chat",
        base_url=f"{gateway.url}/v1",
        api_key=KEY,  # type: ignore[arg-type]
        max_tokens=8,  # type: ignore[call-arg]
        temperature=0,
        max_retries=0,
    )
    answer = chat.invoke("hello there")
    assert isinstance(answer.content, str)
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] == 8
    streamed = "".join(str(chunk.content) for chunk in chat.stream("hello there"))
    assert streamed == answer.content  # greedy: the same tokens, streamed


def test_langchain_embeddings_equal_vllm_direct(
    gateway: GatewayProcess, vllm: dict[str, str]
) -> None:
    """`check_embedding_ctx_length=False`: else LangChain sends tiktoken ids of OpenAI's
    tokenizer, not text (see docs/clients.md)."""
    embeddings = OpenAIEmbeddings(
        model="tiny-embed",
        base_url=f"{gateway.url}/v1",
        api_key=KEY,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    vectors = embeddings.embed_documents(DOCUMENTS)
    assert same_vectors(vectors, direct_embeddings(vllm, DOCUMENTS))


CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"  # scripts/setup-env.sh builds it


def run_client(script: str, gateway: GatewayProcess) -> dict[str, Any]:
    """A script of tests/integration/clients/ in the clients' own environment; its last line
    of output is its JSON report (LiteLLM prints advice of its own before it)."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no download at import
    done = subprocess.run(
        [str(CLIENTS_PYTHON), str(CLIENTS / script), gateway.url, KEY],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def direct_embeddings(vllm: dict[str, str], texts: list[str]) -> list[list[float]]:
    data = httpx.post(
        f"{vllm['tiny-embed']}/v1/embeddings",
        json={"model": "tiny-embed", "input": texts},
        timeout=60,
    ).json()["data"]
    return [d["embedding"] for d in data]


def same_vectors(got: list[list[float]], expected: list[list[float]]) -> bool:
    """Equal within float noise: vLLM's CPU kernels give a text's embedding a last digit that
    depends on what it was batched with. Sent as token ids instead of text (LangChain's
    default), a vector would differ in every coordinate, far beyond this."""
    return len(got) == len(expected) and all(
        g == pytest.approx(e, abs=1e-4) for g, e in zip(got, expected, strict=True)
    )


PAIR = ["a cat sat on the mat", "stock prices fell"]  # what the client scripts embed


def test_llamaindex_openai_like_chat_stream_and_embeddings(
    gateway: GatewayProcess, vllm: dict[str, str]
) -> None:
    report = run_client("llamaindex_check.py", gateway)
    assert report["chat"] == report["streamed"]  # greedy: the same text, streamed
    assert same_vectors(report["vectors"], direct_embeddings(vllm, PAIR))


def test_litellm_as_a_library_chat_stream_embeddings_and_errors(
    gateway: GatewayProcess, vllm: dict[str, str]
) -> None:
    report = run_client("litellm_check.py", gateway)
    assert report["usage"] == 8 and report["chat"] == report["streamed"]
    assert same_vectors(report["vectors"], direct_embeddings(vllm, PAIR))
    assert report["missing"] == "NotFoundError 404"
