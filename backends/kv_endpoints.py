"""Where a spawned server publishes its KV-cache events (``--kv-events-config``), and the
private directory its ipc socket lives in.

The events carry prompts' token ids, so a socket anyone on the host can connect to would leak
them: an ipc endpoint's directory is made mode 0700 before the server starts, and one that
exists but is not this user's alone is refused rather than used."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from backends.errors import SpawnError
from backends.spec import VllmSpec

KV_EVENTS_FLAG = "kv-events-config"


def kv_events_endpoint(spec: VllmSpec) -> str | None:
    """Where the gateway reads a spawned server's KV-cache events, if it publishes them: its
    publisher's endpoint (a wildcard host is the server's own, so the loopback address)."""
    config = spec.args.get(KV_EVENTS_FLAG)
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    if not isinstance(config, dict) or not config.get("enable_kv_cache_events"):
        return None
    if config.get("publisher", "zmq") != "zmq":
        return None
    endpoint = config.get("endpoint", "tcp://*:5557")  # vLLM's default
    if not isinstance(endpoint, str):
        return None
    for wildcard in ("://*:", "://0.0.0.0:"):
        endpoint = endpoint.replace(wildcard, "://127.0.0.1:")
    return endpoint.replace("://[::]:", "://[::1]:")


def prepare_socket_dir(spec: VllmSpec) -> None:
    """Make the directory of ``spec``'s ipc endpoint, if it has one, ours and closed to others."""
    endpoint = kv_events_endpoint(spec)
    if endpoint is None or not endpoint.startswith("ipc://"):
        return
    private_dir(Path(endpoint.removeprefix("ipc://")).parent)


def private_dir(path: Path) -> None:
    """``path`` as a directory only this user can enter; never a link someone else placed."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise SpawnError(f"cannot make the KV-event socket directory {path}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise SpawnError(f"the KV-event socket directory {path} is not this user's directory")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise SpawnError(f"the KV-event socket directory {path} is open to other users")
