"""A request's prompt rendered to stable bytes (a conversation's turn is a prefix of the next), and
how a `balance: prefix` model is configured and fed."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from backends.kv_endpoints import kv_events_endpoint
from backends.pool import Replica, ReplicaPool
from backends.supervisor import Supervisor
from gateway.config_file import ConfigError
from gateway.model_settings import ModelSettings
from gateway.prompt_prefix import kv_event_endpoints, prefix_router, prompt_hashes, render
from gateway.specs import backend_specs
from tests.servers import gateway_settings

SYSTEM = {"role": "system", "content": "You answer questions about the harbour."}


def test_each_turn_of_a_chat_renders_as_a_prefix_of_the_next() -> None:
    first = [SYSTEM, {"role": "user", "content": "When is high tide?"}]
    second = [
        *first,
        {"role": "assistant", "content": "At six."},
        {"role": "user", "content": "And low?"},
    ]
    assert render({"messages": second}).startswith(render({"messages": first}))


def test_a_turn_with_other_messages_still_renders_the_earlier_turns_as_its_prefix() -> None:
    """The plain conversation is joined in one go, any other message by message: both ways
    render the same bytes for the same messages."""
    first = [SYSTEM, {"role": "user", "content": "When is high tide?"}]
    odd: list[object] = [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "type": "function"}]},
        {"role": "tool", "content": "06:12", "tool_call_id": "t1"},
        {"role": "user", "content": [{"type": "text", "text": "And low?"}]},
        {"role": "user"},
        {"content": "no role"},
        {"role": 7, "content": "a number"},
        ["user", "a list"],
        "ab",
        None,
    ]
    plain = render({"messages": first})
    system = SYSTEM["content"].encode()
    assert plain == b"\x1esystem\x1f" + system + b"\x1euser\x1fWhen is high tide?"
    for message in odd:
        later = render({"messages": [*first, message]})
        assert later.startswith(plain) and len(later) > len(plain), message
        assert render({"messages": [message, *first]}).endswith(plain), message


def test_key_order_and_text_parts_do_not_change_the_rendering() -> None:
    as_text = {"messages": [{"role": "user", "content": "Hi there"}]}
    as_parts = {"messages": [{"content": [{"type": "text", "text": "Hi there"}], "role": "user"}]}
    assert render(as_text) == render(as_parts)


def test_tools_and_system_prompts_come_first() -> None:
    tools = [{"type": "function", "function": {"name": "tide"}}]
    with_tools = render({"tools": tools, "messages": [{"role": "user", "content": "Hi"}]})
    assert with_tools.index(b"tide") < with_tools.index(b"Hi")
    anthropic = render({"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]})
    assert anthropic.index(b"Be brief.") < anthropic.index(b"Hi")


def test_completions_and_responses_prompts_are_rendered() -> None:
    assert render({"prompt": "Once upon a time"}) == b"Once upon a time"
    assert render({"prompt": [1, 2]}) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    assert b"Summarise" in render({"instructions": "Summarise", "input": "the log"})


def test_a_body_without_a_prompt_renders_empty() -> None:
    assert render({"model": "m"}) == b""


def test_only_a_pool_balanced_by_prefix_gets_hashes() -> None:
    long = {"messages": [{"role": "user", "content": "x" * 1000}]}
    prefix = ModelSettings(name="m", url="http://127.0.0.1:1", balance="prefix")
    plain = ModelSettings(name="m", url="http://127.0.0.1:1")
    assert prefix_router(plain) is None
    assert prompt_hashes(ReplicaPool("m"), long, None) is None
    routed = ReplicaPool("m", policy="prefix", prefix=prefix_router(prefix))
    hashes = prompt_hashes(routed, long, None)
    assert hashes is not None and len(hashes) == 1000 // prefix.prefix.block_bytes
    assert prompt_hashes(routed, long, "sql") != hashes  # an adapter's prefixes are its own


def test_spawned_prefix_models_publish_kv_events_on_an_endpoint_per_replica() -> None:
    settings = gateway_settings(
        [
            {"name": "p", "vllm": {"model": "/models/m", "replicas": 2}, "balance": "prefix"},
            {"name": "q", "vllm": {"model": "/models/m"}},
        ]
    )
    specs = backend_specs(settings)
    endpoints = [kv_events_endpoint(spec) for spec in specs]
    assert endpoints[2] is None  # not balanced by prefix: nothing published
    assert endpoints[0] and endpoints[1] and endpoints[0] != endpoints[1]
    assert all(e.startswith("ipc://") for e in endpoints[:2] if e)  # vLLM binds, we connect
    folders = {Path(e.removeprefix("ipc://")).parent for e in endpoints[:2] if e}
    assert len(folders) == 1  # one folder of the gateway's own (made 0700 as a server starts)
    command = specs[0].command(8000, None)
    config = orjson.loads(command[command.index("--kv-events-config") + 1])
    assert config == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoints[0]}


def test_the_kv_event_endpoint_is_the_next_gateways_too_so_its_servers_are_adopted(
    tmp_path: Path,
) -> None:
    """Adoption compares commands: an endpoint named by the gateway's pid would differ for the
    next gateway, and a kept prefix model would restart. It is named by the state directory."""
    model = {"name": "p", "vllm": {"model": "/models/m"}, "balance": "prefix"}

    def endpoint(state: Path) -> str | None:
        settings = gateway_settings([model]).model_copy(update={"state_dir": str(state)})
        return kv_events_endpoint(backend_specs(settings)[0])

    here = endpoint(tmp_path / "a")
    assert here == endpoint(tmp_path / "a")
    assert here is not None and str(os.getpid()) not in here
    assert here != endpoint(tmp_path / "b")  # another gateway's servers publish elsewhere


def test_each_replica_is_read_where_it_publishes(tmp_path: Path) -> None:
    settings = gateway_settings(
        [
            {
                "name": "c",
                "urls": ["http://127.0.0.1:9001", "http://127.0.0.1:9002"],
                "balance": "prefix",
                "prefix": {"kv_events": ["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"]},
            },
            {"name": "s", "vllm": {"model": "/models/m"}, "balance": "prefix"},
            {
                "name": "d",
                "discover": {"dns": "pods:8000"},
                "balance": "prefix",
                "prefix": {"kv_events_port": 5557},
            },
            {"name": "n", "urls": ["http://127.0.0.1:9003"], "balance": "prefix"},
        ],
        log_dir=str(tmp_path),
    )
    connect, spawn, discover, none = settings.models
    supervisor = Supervisor(backend_specs(settings), log_dir=tmp_path)
    listed = kv_event_endpoints(connect, supervisor)
    assert listed is not None
    assert [listed(Replica(url=u)) for u in connect.endpoints] == [
        "tcp://127.0.0.1:5557",
        "tcp://127.0.0.1:5558",
    ]
    assert listed(Replica(url="http://127.0.0.1:9009")) is None  # not one of its URLs
    spawned = kv_event_endpoints(spawn, supervisor)
    assert spawned is not None
    (spec,) = [b.spec for b in supervisor.backends.values()]
    endpoint = spawned(supervisor.lives["s"].replicas[0])
    assert endpoint == kv_events_endpoint(spec) and endpoint.startswith("ipc://")
    assert spawned(Replica(url="http://127.0.0.1:9001")) is None  # not one of its servers
    pods = kv_event_endpoints(discover, supervisor)
    assert pods is not None
    assert pods(Replica(url="http://10.0.0.5:8000", address="10.0.0.5:8000")) == (
        "tcp://10.0.0.5:5557"
    )
    assert pods(Replica(url="http://[fd00::5]:8000", address="[fd00::5]:8000")) == (
        "tcp://[fd00::5]:5557"
    )
    assert kv_event_endpoints(none, supervisor) is None


def test_a_kv_events_config_of_ones_own_is_read_on_the_servers_host() -> None:
    own = {"enable_kv_cache_events": True, "endpoint": "tcp://*:5600"}
    model = {
        "name": "p",
        "vllm": {"model": "/models/m", "args": {"kv-events-config": own}},
        "balance": "prefix",
    }
    (spec,) = backend_specs(gateway_settings([model]))
    assert spec.args["kv-events-config"] == own  # kept as given
    assert kv_events_endpoint(spec) == "tcp://127.0.0.1:5600"
    off = {**model, "vllm": {"model": "/models/m", "args": {"kv-events-config": {"x": 1}}}}
    assert kv_events_endpoint(backend_specs(gateway_settings([off]))[0]) is None


def test_kv_event_endpoints_are_one_per_url() -> None:
    model = {"name": "c", "urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"]}
    with pytest.raises(ConfigError) as info:
        gateway_settings([{**model, "prefix": {"kv_events": ["tcp://127.0.0.1:5557"]}}])
    assert any("one endpoint per URL" in problem for problem in info.value.problems)


def test_a_kv_events_port_is_for_discovered_pods() -> None:
    model = {"name": "c", "urls": ["http://127.0.0.1:1"], "balance": "prefix"}
    with pytest.raises(ConfigError) as info:
        gateway_settings([{**model, "prefix": {"kv_events_port": 5557}}])
    assert any("for discovered replicas" in problem for problem in info.value.problems)


def test_prefix_settings_without_balance_prefix_are_refused() -> None:
    model = {"name": "c", "urls": ["http://127.0.0.1:1"], "prefix": {"load_slack": 4}}
    with pytest.raises(ConfigError) as info:
        gateway_settings([model])
    assert any("balance: prefix" in problem for problem in info.value.problems)
