"""What the benchmark puts between the load client and the fake vLLM: each target, started alone.

Every target gets CPU 1 to itself (taskset) and one worker process, so the numbers compare the
cost of one core's worth of each. A peer that is not installed is skipped and the report says
so: nginx from Debian (`apt-get install nginx`), vllm-router and LiteLLM from PyPI, each in its
own virtual environment under .cache/peers (`load/bench.py --install-peers` makes them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".cache" / "peers"
BENCH_KEY = "sk-bench-0123456789abcdef"  # a throwaway key for the benchmark's targets


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """``revision`` in a temporary detached git worktree (the side a comparison runs against),
    removed afterwards."""
    where = Path(tempfile.mkdtemp()) / "base"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(where), revision], check=True)
    try:
        yield where
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(where)], check=False)


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if (os.cpu_count() or 1) > 1 else cmd


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@dataclass
class Target:
    name: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_fake(port: int) -> Target:
    cmd = [sys.executable, str(ROOT / "tests" / "fake_vllm.py"), "--port", str(port)]
    proc = subprocess.Popen(
        pinned(0, [*cmd, "--served-model-name", "fake"]), stdout=subprocess.DEVNULL
    )
    target = Target("direct", port, [proc])
    wait_http(target.url + "/health")
    return target


def start_gateway(
    port: int,
    upstream: str,
    workers: int = 1,
    root: Path = ROOT,
    extra: dict[str, object] | None = None,
) -> Target:
    """The gateway as users run it (`python -m gateway serve`): an API key, access log on.

    ``workers`` > 1 starts that many gateway processes on ports port, port+1, ...: replicas,
    as a deployment scales the gateway (the load client spreads over them). ``root``: the
    checkout whose code runs (load/ab.py compares two). ``extra``: more config (`tracing`).
    """
    config = {
        **(extra or {}),
        # Lenient health checks: the one fake serves every target, and another target's 1,000
        # streams can hold its /health past the default 2 s timeout; the gateway would then
        # rightly mark it down and answer 503 in the next scenario (seen 2026-11-30).
        "models": [{"name": "fake", "url": upstream, "health": {"timeout": 30}}],
        "api_keys": [BENCH_KEY],
        "log_level": "info",
    }
    path = Path(tempfile.mkdtemp()) / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    procs = []
    for i in range(workers):
        cpu = 1 if workers == 1 else i % (os.cpu_count() or 1)
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
        procs.append(
            subprocess.Popen(
                pinned(cpu, [*cmd, "--port", str(port + i)]),
                cwd=root,
                stdout=open(path.parent / f"gateway-{port + i}.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
        )
    print(f"gateway log: {path.parent}/gateway-{port}.log", flush=True)
    name = "vllm-gateway" if workers == 1 else f"vllm-gateway x{workers}"
    target = Target(name, port, procs, {"Authorization": f"Bearer {BENCH_KEY}"})
    for i in range(workers):
        wait_http(f"http://127.0.0.1:{port + i}/health")
    return target


NGINX_CONF = """
worker_processes 1;
user root;  # ignored unless run as root; as root, no need for a `nobody` user on the machine
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;  # else nginx closes each client connection after 1,000
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;  # unused, but nginx creates them at start: none under /var
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_max_body_size 32m;
  upstream vllm {{ server {upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://vllm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


def start_nginx(port: int, upstream: str) -> Target | str:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        return "nginx is not installed (apt-get install nginx)"
    work = Path(tempfile.mkdtemp())
    conf = work / "nginx.conf"
    hostport = upstream.removeprefix("http://")
    conf.write_text(NGINX_CONF.format(dir=work, upstream=hostport, port=port))
    cmd = [nginx, "-c", str(conf), "-p", str(work), "-g", "daemon off;"]
    return _launch("nginx", port, cmd, "/health")


def start_vllm_router(port: int, upstream: str) -> Target | str:
    binary = PEERS / "router" / "bin" / "vllm-router"
    if not binary.exists():
        return "vllm-router is not installed (load/bench.py --install-peers)"
    cmd = [str(binary), "--worker-urls", upstream, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--policy", "round_robin"]
    return _launch("vllm-router", port, cmd, "/health")


def start_litellm(port: int, upstream: str) -> Target | str:
    binary = PEERS / "litellm" / "bin" / "litellm"
    if not binary.exists():
        return "LiteLLM is not installed (load/bench.py --install-peers)"
    config = {
        "model_list": [
            {
                "model_name": "fake",
                "litellm_params": {
                    "model": "openai/fake",
                    "api_base": upstream + "/v1",
                    "api_key": "none",
                },
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": BENCH_KEY},  # it refuses to start without one
    }
    path = Path(tempfile.mkdtemp()) / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [str(binary), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--num_workers", "1"]
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    return _launch("LiteLLM", port, cmd, "/health/liveliness", headers, env, timeout=120)


def _launch(
    name: str,
    port: int,
    cmd: list[str],
    health: str,
    headers: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Target:
    """A peer on CPU 1, quiet, and the wait until it answers."""
    proc = subprocess.Popen(
        pinned(1, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    target = Target(name, port, [proc], headers or {})
    wait_http(target.url + health, timeout=timeout)
    return target


def install_peers() -> None:
    """Each PyPI peer in its own venv: their dependencies never touch the project's."""
    for name, spec in (("router", "vllm-router==0.1.17"), ("litellm", "litellm[proxy]")):
        venv = PEERS / name
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec], check=True)
