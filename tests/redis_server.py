"""A real Redis for the tests: Debian's `redis-server`, on a free loopback port, with nothing
written to disk. Started by the test session (``redis_server`` in tests/conftest.py) or by a
test that stops it mid-run (``stop``, then ``start`` again on the same port)."""

from __future__ import annotations

import shutil
import subprocess

import redis

from backends.process import free_port
from tests.helpers import wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
        if self.password is not None:
            command += ["--requirepass", self.password]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(self._answers, 15, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """Redis goes away: its port refuses connections until ``start``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False
