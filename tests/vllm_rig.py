"""Real vLLM CPU servers for the integration tests, started once per session in the background.

A CPU vLLM server takes one to three minutes to load, so the rig starts every server as soon as
pytest has collected a test that needs one, lets the fast tests run meanwhile, and makes the
first integration test wait for readiness. Two groups start together:

- four connect-mode servers (chat, reasoner, embedder, reranker) the tests also call directly,
  to compare the gateway's answers with the backend's own;
- one gateway process in spawn mode, which starts its own tiny chat server.

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

import yaml

from backends.process import free_port
from backends.spec import VllmSpec
from backends.tiny_models import build_all
from tests.servers import ROOT, answers, subprocess_env

MODELS_DIR = ROOT / ".cache" / "tiny-models"
ARTIFACTS = ROOT / ".artifacts"
READY_TIMEOUT = float(os.environ.get("VLLM_GATEWAY_TEST_READY_TIMEOUT", "900"))
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
PYTHON_LAUNCHER = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")

# name -> (tiny model kind, extra vllm serve flags)
BACKENDS: dict[str, tuple[str, dict[str, object]]] = {
    "tiny-chat": ("chat", {"max-model-len": 1024}),
    "tiny-reasoner": ("chat", {"max-model-len": 1024, "reasoning-parser": "deepseek_r1"}),
    "tiny-embed": ("embed", {"runner": "pooling"}),
    "tiny-rerank": ("rerank", {"runner": "pooling"}),
}


def spec_for(name: str, kind: str, args: dict[str, object]) -> VllmSpec:
    return VllmSpec(
        name=name,
        model=str(MODELS_DIR / kind),
        launcher=PYTHON_LAUNCHER,
        args={"dtype": "float32", **args},
        env=CPU_ENV,
    )


@dataclass
class VllmRig:
    urls: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    spawn_gateway_url: str | None = None
    spawn_gateway: subprocess.Popen[bytes] | None = None
    reused: bool = False

    def start(self) -> None:
        """Start everything and return at once; ``wait_ready`` blocks."""
        if self.procs or self.reused:
            return
        ARTIFACTS.mkdir(exist_ok=True)
        build_all(MODELS_DIR)
        if reuse := os.environ.get("VLLM_GATEWAY_TEST_URLS"):
            self.urls = dict(pair.split("=", 1) for pair in reuse.split(","))
            self.reused = True
        else:
            for name, (kind, args) in BACKENDS.items():
                port = free_port()
                cmd = spec_for(name, kind, args).command(port, api_key=None)
                self.procs.append(_launch(cmd, ARTIFACTS / f"vllm-{name}.log", CPU_ENV))
                self.urls[name] = f"http://127.0.0.1:{port}"
        self._start_spawn_gateway()

    def _start_spawn_gateway(self) -> None:
        port = free_port()
        config = {
            "launcher": list(PYTHON_LAUNCHER),
            "log_dir": str(ARTIFACTS / "spawned"),
            "api_keys": ["sk-spawn"],
            "models": [
                {
                    "name": "spawned-chat",
                    "aliases": ["sc"],
                    "vllm": {
                        "model": str(MODELS_DIR / "chat"),
                        "args": {"dtype": "float32", "max-model-len": 512},
                        "env": CPU_ENV,
                    },
                }
            ],
        }
        path = ARTIFACTS / "spawn-gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
        self.spawn_gateway = subprocess.Popen(
            cmd,
            stdout=open(ARTIFACTS / "spawn-gateway.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=ROOT,
        )
        self.spawn_gateway_url = f"http://127.0.0.1:{port}"

    def wait_ready(self) -> dict[str, str]:
        deadline = time.monotonic() + READY_TIMEOUT
        for name, url in self.urls.items():
            while not answers(url + "/health"):
                for proc in self.procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a vLLM server exited; see {ARTIFACTS}/vllm-*.log")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {READY_TIMEOUT}s")
                time.sleep(1)
        return self.urls

    def stop(self) -> None:
        procs = [*self.procs, *([self.spawn_gateway] if self.spawn_gateway else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _launch(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start under the reaper, so nothing outlives the test session even if pytest is killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "backends.reaper", "--", *cmd],
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        env=subprocess_env(**env),
        cwd=ROOT,
    )
