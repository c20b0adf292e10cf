"""Real vLLM CPU servers for the integration tests, started once per session in the background.

A CPU vLLM server takes one to three minutes to load, so the rig starts every server as soon as
pytest has collected a test that needs one, lets the fast tests run meanwhile, and makes the
first integration test wait for readiness. Two groups start together:

- four connect-mode servers (chat, reasoner, embedder, reranker) the tests also call directly,
  to compare the gateway's answers with the backend's own;
- two gateway processes in spawn mode, which start their own servers (one of them is killed
  with SIGKILL by a test, to show that its vLLM server dies with it).

The chat server also serves a LoRA adapter (`sql`), and the spawned chat model may load
adapters at runtime. A second tiny-chat server listens on 127.0.0.2 with the chat server's port:
two "pods" of one model for the DNS discovery test, which stops it when done (so the on-demand
tests that follow stay within the budget of eight servers at once).

Set VLLM_GATEWAY_TEST_URLS="tiny-chat=http://127.0.0.1:18001,..." to reuse running servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backends.process import free_port
from backends.spec import VllmSpec
from gateway.commands.tiny_models import build_all
from tests.servers import ROOT, GatewayProcess, subprocess_env

MODELS_DIR = ROOT / ".cache" / "tiny-models"
ARTIFACTS = ROOT / ".artifacts"
READY_TIMEOUT = float(os.environ.get("VLLM_GATEWAY_TEST_READY_TIMEOUT", "900"))
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # lets the CPU build take `uni` (see CPU_ARGS)
}
PYTHON_LAUNCHER = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")

# name -> (tiny model kind, extra vllm serve flags)
LORA = MODELS_DIR / "lora"  # a rank-8 adapter of the tiny chat model
# One chat server serves the base model and a LoRA adapter (`sql`), and may load more at runtime.
LORA_ARGS: dict[str, object] = {
    "enable-lora": True,
    "lora-modules": [f"sql={LORA}"],
    "max-lora-rank": 8,
}
BACKENDS: dict[str, tuple[str, dict[str, object]]] = {
    "tiny-chat": ("chat", {"max-model-len": 1024, **LORA_ARGS}),
    "tiny-reasoner": ("chat", {"max-model-len": 1024, "reasoning-parser": "deepseek_r1"}),
    "tiny-embed": ("embed", {"runner": "pooling"}),
    "tiny-rerank": ("rerank", {"runner": "pooling"}),
}


POD_HOST = "127.0.0.2"  # the second tiny-chat "pod": same port, another loopback address

# Eager mode: no torch.compile warm-up. `uni`: the model runs in the engine core process instead
# of a worker process of its own, one Python start-up less (API server and engine core remain).
CPU_ARGS: dict[str, object] = {
    "dtype": "float32",
    "enforce-eager": True,
    "distributed-executor-backend": "uni",
}


def cpu_env(core: int) -> dict[str, str]:
    """vLLM's CPU build binds every server's compute to core 0 unless told otherwise; spreading
    the servers over both cores halves the time they take to start together."""
    return {
        **CPU_ENV,
        "VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1)),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # only servers started with LoRA use it
    }


def spec_for(name: str, kind: str, args: dict[str, object], core: int) -> VllmSpec:
    return VllmSpec(
        name=name,
        model=str(MODELS_DIR / kind),
        launcher=PYTHON_LAUNCHER,
        args={**CPU_ARGS, **args},
        env=cpu_env(core),
    )


@dataclass
class VllmRig:
    urls: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    spawned: dict[str, GatewayProcess] = field(default_factory=dict)
    started: bool = False
    pod: subprocess.Popen[bytes] | None = None  # tiny-chat on POD_HOST, under its reaper
    pod_url: str = ""
    _pod_launch: tuple[list[str], dict[str, str]] = ([], {})

    def start(self) -> None:
        """Start everything and return at once; ``wait_ready`` blocks."""
        if self.started:
            return
        self.started = True
        ARTIFACTS.mkdir(exist_ok=True)
        build_all(MODELS_DIR)
        if reuse := os.environ.get("VLLM_GATEWAY_TEST_URLS"):
            self.urls = dict(pair.split("=", 1) for pair in reuse.split(","))
        else:
            for core, (name, (kind, args)) in enumerate(BACKENDS.items()):
                port = free_port()
                spec = spec_for(name, kind, args, core)
                cmd = spec.command(port, api_key=None)
                self.procs.append(_launch(cmd, ARTIFACTS / f"vllm-{name}.log", dict(spec.env)))
                self.urls[name] = f"http://127.0.0.1:{port}"
        chat_port = int(self.urls["tiny-chat"].rsplit(":", 1)[1])
        kind, args = BACKENDS["tiny-chat"]
        spec = spec_for("tiny-chat", kind, args, core=1)
        self._pod_launch = (spec.command(chat_port, api_key=None, host=POD_HOST), dict(spec.env))
        self.pod_url = f"http://{POD_HOST}:{chat_port}"
        self.start_pod()
        # One config mixing both modes: a spawned chat model (two replicas) and the rig's
        # embedder.
        self._spawn_gateway(
            "mixed",
            [
                _spawned(
                    "spawned-chat",
                    "chat",
                    ["sc"],
                    core=0,
                    replicas=2,
                    lora={"max_rank": 8, "runtime": True},
                ),
                {"name": "tiny-embed", "url": self.urls["tiny-embed"]},
            ],
        )
        self._spawn_gateway(
            "doomed", [_spawned("doomed-embed", "embed", [], core=1, runner="pooling")]
        )

    def start_pod(self) -> None:
        """Start (or start again, once it is gone) the second tiny-chat "pod"."""
        assert self.pod is None or self.pod.poll() is not None, "the pod still runs"
        cmd, env = self._pod_launch
        self.pod = _launch(cmd, ARTIFACTS / "vllm-tiny-chat-pod.log", env)

    def stop_pod(self) -> None:
        if self.pod is not None and self.pod.poll() is None:
            self.pod.send_signal(signal.SIGTERM)
            self.pod.wait(60)

    def _spawn_gateway(self, label: str, models: list[dict[str, object]]) -> None:
        config = {
            "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
            "log_dir": str(ARTIFACTS / f"spawned-{label}"),
            "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
            "models": models,
        }
        self.spawned[label] = GatewayProcess(config, ARTIFACTS)

    def wait_ready(self) -> dict[str, str]:
        deadline = time.monotonic() + READY_TIMEOUT
        for name, url in self.urls.items():
            while not _serves(url, name):
                for server, proc in zip(self.urls, self.procs, strict=False):
                    if proc.poll() is not None:
                        log = ARTIFACTS / f"vllm-{server}.log"
                        tail = log.read_text(errors="replace").splitlines()[-5:]
                        raise RuntimeError(f"{server} exited; {log} ends:\n" + "\n".join(tail))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {READY_TIMEOUT}s")
                time.sleep(1)
        while self.pod is not None and not _serves(self.pod_url, "tiny-chat"):
            if self.pod.poll() is not None:
                raise RuntimeError(
                    f"the tiny-chat pod exited; see {ARTIFACTS}/vllm-tiny-chat-pod.log"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tiny-chat pod not ready after {READY_TIMEOUT}s")
            time.sleep(1)
        # Spawned models too: a server still warming up starves the others on 2 cores.
        for label, gw in self.spawned.items():
            for model in gw.config["models"]:
                while not _tokenizes(gw.url, model["name"]):
                    if gw.proc.poll() is not None:
                        raise RuntimeError(f"gateway {label} exited; see {gw.log}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{model['name']} not ready after {READY_TIMEOUT}s")
                    time.sleep(1)
        return self.urls

    def stop(self) -> None:
        procs = [*self.procs, *(g.proc for g in self.spawned.values())]
        if self.pod is not None:
            procs.append(self.pod)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _spawned(
    name: str,
    kind: str,
    aliases: list[str],
    core: int,
    replicas: int = 1,
    lora: dict[str, object] | None = None,
    **args: object,
) -> dict[str, object]:
    vllm: dict[str, object] = {
        "model": str(MODELS_DIR / kind),
        "replicas": replicas,
        "args": {**CPU_ARGS, "max-model-len": 512, **args},
        "env": cpu_env(core),
    }
    if lora is not None:
        vllm["lora"] = lora
    return {"name": name, "aliases": aliases, "vllm": vllm}


def _serves(url: str, model: str) -> bool:
    """The server at ``url`` lists ``model``: health alone would also be answered by whatever
    else took the port."""
    try:
        response = httpx.get(f"{url}/v1/models", timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and model in {m["id"] for m in response.json()["data"]}


def _tokenizes(url: str, model: str) -> bool:
    try:
        response = httpx.post(
            f"{url}/tokenize",
            json={"model": model, "prompt": "x"},
            headers={"Authorization": "Bearer sk-spawn"},
            timeout=5,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _launch(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start under the reaper, so nothing outlives the test session even if pytest is killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "backends.reaper", "--", *cmd],
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        env=subprocess_env(**env),
        cwd=ROOT,
    )
