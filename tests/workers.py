"""A gateway with `workers: N` as a test sees it: its worker processes, and connections made
to one chosen worker (the kernel spreads connections over them; /proc says which got which)."""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import wait_until
from tests.servers import GatewayProcess, descendants


def metric(gateway: GatewayProcess, pattern: str, key: str) -> float:
    """The value of the one series of the whole gateway's /metrics that ``pattern`` matches
    (0 while it has none)."""
    text = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    found = re.search(pattern + r" ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def worker_pids(gateway: GatewayProcess) -> list[int]:
    """The `python -m gateway worker` processes below the gateway, by row."""
    found: dict[int, int] = {}
    for pid in descendants(gateway.proc.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv and b"gateway" in argv and b"--row" in argv:
            found[int(argv[argv.index(b"--row") + 1])] = pid
    return [found[row] for row in sorted(found)]


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.rsplit(":", 1)[1], 16) == local_port and (
                int(remote.rsplit(":", 1)[1], 16) == remote_port and inode
            ):
                return inode
    return None


def _holder(inode: int, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if fd.readlink().as_posix() == target:
                    return pid
            except OSError:
                continue
    return None


class Client:
    """One kept-alive connection to the gateway, and the worker that accepted it."""

    def __init__(self, gateway: GatewayProcess, pids: list[int]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
        self.conn.connect()
        client_port = self.conn.sock.getsockname()[1]
        self.worker = 0
        self.headers: dict[str, str] = {}  # of the last response

        def accepted() -> bool:
            inode = _socket_inode(gateway.port, client_port)
            holder = _holder(inode, pids) if inode is not None else None
            self.worker = holder or 0
            return holder is not None

        wait_until(accepted, 10, "a worker accepting the connection")

    def call(
        self, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int, bytes]:
        response = self.open(method, path, body, key)
        return response.status, response.read()

    def open(
        self, method: str, path: str, body: Any = None, key: str | None = None
    ) -> http.client.HTTPResponse:
        """The response once its head came; its body is the caller's to read (or to leave
        unread while it streams, to ``close`` later)."""
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        return response

    def close(self) -> None:
        self.conn.close()


def one_on_each(gateway: GatewayProcess, pids: list[int], timeout: float = 60) -> dict[int, Client]:
    """A connection accepted by each of ``pids`` (the others made on the way are closed), once
    each listens (a worker that just started may not yet)."""
    chosen: dict[int, Client] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = Client(gateway, pids)
        if client.worker in chosen:
            client.close()
        else:
            chosen[client.worker] = client
        if len(chosen) == len(pids):
            return chosen
    raise AssertionError(f"connections reached only workers {sorted(chosen)} of {pids}")
