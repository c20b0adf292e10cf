"""Only configured backends are reachable, whatever a client puts in `model`."""

import pytest

from backends.pool import Replica, ReplicaPool
from gateway.errors import ModelNotFound
from gateway.routing import RELAYED_PATHS, RouteTable


def table() -> RouteTable:
    chat = ReplicaPool("tiny-chat", [Replica("http://127.0.0.1:1")])
    embed = ReplicaPool("tiny-embed", [Replica("http://127.0.0.1:2")])
    return RouteTable([(chat, ["chat"]), (embed, [])])


def test_names_and_aliases_resolve_to_their_pool() -> None:
    routes = table()
    assert routes.resolve("tiny-chat").pool.name == "tiny-chat"
    assert not routes.resolve("tiny-chat").via_alias
    assert routes.resolve("chat").pool.name == "tiny-chat"
    assert routes.resolve("chat").via_alias
    assert routes.names == ["tiny-chat", "chat", "tiny-embed"]


@pytest.mark.parametrize("model", ["gpt-4", "../tiny-chat", "tiny-chat/..", "%2e%2e", "TINY-CHAT"])
def test_unknown_models_are_404_and_name_the_available_ones(model: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        table().resolve(model)
    assert info.value.status == 404
    assert info.value.param == "model"
    assert "Available models: tiny-chat, chat, tiny-embed." in info.value.message


def test_a_huge_unknown_name_is_shortened_in_the_message() -> None:
    with pytest.raises(ModelNotFound) as info:
        table().resolve("x" * 250)
    assert len(info.value.message) < 250


def test_every_vllm_endpoint_is_relayed() -> None:
    for path in (
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/score",
        "/tokenize",
        "/v1/responses",
        "/v1/messages",
        "/v1/audio/transcriptions",
    ):
        assert path in RELAYED_PATHS
