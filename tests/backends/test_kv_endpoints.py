"""A spawned server's KV-event socket lives in a directory only the gateway's user can enter:
the events carry prompts' token ids."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from backends.errors import SpawnError
from backends.kv_endpoints import kv_events_endpoint, prepare_socket_dir
from backends.spec import VllmSpec


def publishing(endpoint: str) -> VllmSpec:
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}
    return VllmSpec(name="p", model="/models/m", args={"kv-events-config": config})


def test_an_ipc_endpoints_directory_is_made_for_this_user_alone(tmp_path: Path) -> None:
    home = tmp_path / "vllm-gateway-kv-abc"
    prepare_socket_dir(publishing(f"ipc://{home}/p"))
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    prepare_socket_dir(publishing(f"ipc://{home}/p"))  # the next start finds it as it left it


def test_a_directory_others_can_enter_is_refused_not_used(tmp_path: Path) -> None:
    home = tmp_path / "open"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    with pytest.raises(SpawnError, match="open to other users"):
        prepare_socket_dir(publishing(f"ipc://{home}/p"))


def test_a_link_in_the_directorys_place_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "kv").symlink_to(elsewhere)
    with pytest.raises(SpawnError, match="not this user's directory"):
        prepare_socket_dir(publishing(f"ipc://{tmp_path / 'kv'}/p"))


def test_a_tcp_endpoint_needs_no_directory(tmp_path: Path) -> None:
    spec = publishing("tcp://*:5600")
    prepare_socket_dir(spec)
    assert kv_events_endpoint(spec) == "tcp://127.0.0.1:5600"
    assert list(tmp_path.iterdir()) == []
