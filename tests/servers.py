"""Real local servers for tests: the gateway on loopback, fake and real vLLM processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from backends.process import free_port
from gateway.app import create_app
from gateway.config_file import settings_from_dict
from gateway.server import uvicorn_config
from gateway.settings import GatewaySettings
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
FAKE_VLLM = str(ROOT / "tests" / "fake_vllm.py")


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


class FakeBackend:
    """A fake vLLM server process on a free loopback port."""

    def __init__(
        self,
        name: str = "fake",
        *args: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        wait: bool = True,
    ) -> None:
        """``host``: any loopback address (127.0.0.2 is a second "pod" on the same port);
        ``wait``: until it answers /health (not for one started with --startup-delay)."""
        self.name = name
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                FAKE_VLLM,
                "--host",
                host,
                "--port",
                str(self.port),
                "--served-model-name",
                name,
                *args,
            ],
            stdout=subprocess.DEVNULL,
        )
        if wait:
            wait_until(lambda: answers(self.url + "/health"), 15, f"fake backend {name}")

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = httpx.get(self.url + "/fake/stats").json()
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class GatewayServer:
    """The gateway app under a real uvicorn, in a thread, on a free loopback port."""

    def __init__(
        self, settings: GatewaySettings, http: str | None = None, **app_kwargs: Any
    ) -> None:
        """``http``: another uvicorn protocol than the gateway's own, e.g. "h11"."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(settings, **app_kwargs)
        options: dict[str, Any] = {"http": http} if http else {}
        config = uvicorn_config(
            app,
            settings,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "gateway start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def gateway_settings(models: list[dict[str, Any]], **extra: Any) -> GatewaySettings:
    return settings_from_dict({"models": models, **extra}, env={})


@contextlib.contextmanager
def running_gateway(models: list[dict[str, Any]], **extra: Any) -> Iterator[GatewayServer]:
    server = GatewayServer(gateway_settings(models, **extra))
    try:
        yield server
    finally:
        server.close()


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has already exited


class GatewayProcess:
    """`python -m gateway serve` as users run it, in its own process, on a free port."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        import yaml

        workdir.mkdir(parents=True, exist_ok=True)
        # Servers stop with a test's gateway unless the test is about keeping them.
        config = {"keep_backends": 0, **config}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config
        self.log = workdir / f"gateway-{self.port}.log"
        path = self.path = workdir / f"gateway-{self.port}.yaml"  # a reload reads it again
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(path),
                "--port",
                str(self.port),
            ],
            stdout=open(self.log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=ROOT,
        )
        try:
            wait_until(self._listening, 60, "gateway process start")
        except BaseException:
            self.close()  # a gateway that came up late must not outlive the session
            raise

    def _listening(self) -> bool:
        """This process, not another that took the port meanwhile, serves it."""
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"gateway exited; {self.log} ends:\n" + "\n".join(tail))
        running = f"Uvicorn running on {self.url} "
        return running in self.log.read_text(errors="replace") and answers(self.url + "/health")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
