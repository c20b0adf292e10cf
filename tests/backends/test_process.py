"""Ports for new servers: the kernel's answer is not enough when servers bind late."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from backends import process


class KernelOffering:
    """A socket whose bind(0) gets the next port from a fixed list, as the kernel may offer a
    port again right after it was closed."""

    def __init__(self, ports: Iterator[int]) -> None:
        self.ports = ports
        self.port = 0

    def __call__(self, *args: Any) -> KernelOffering:
        return self

    def __enter__(self) -> KernelOffering:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        self.port = next(self.ports)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_is_never_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI run that showed it: the rig gave a vLLM server a port, then a gateway got the same
    one and bound it first; the gateway answered at the chat model's address."""
    offering = KernelOffering(iter([40001, 40001, 40001, 40002]))
    monkeypatch.setattr(process.socket, "socket", offering)
    monkeypatch.setattr(process, "_ephemeral_low", lambda: 0)  # the kernel chooses
    monkeypatch.setattr(process, "_recent_ports", process.collections.deque(maxlen=16))
    assert process.free_port() == 40001
    assert process.free_port() == 40002


def test_ports_come_from_below_the_kernels_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outgoing connections and binds to port 0 take ephemeral ports: a server's port from
    below that range cannot be taken by them before the server binds it."""
    monkeypatch.setattr(process, "_ephemeral_low", lambda: 32768)
    ports = {process.free_port() for _ in range(50)}
    assert all(process.LOWEST_PORT <= port < 32768 for port in ports)
