"""Real vLLM CPU servers for the integration tests, started once per session in the background.

A CPU vLLM server takes one to three minutes to load, so the rig starts every server as soon as
pytest has collected a test that needs one, lets the fast tests run meanwhile, and makes the
first integration test wait for readiness. Two groups start together:

- four connect-mode servers (chat, reasoner, embedder, reranker) the tests also call directly,
  to compare the gateway's answers with the backend's own;
- two gateway processes in spawn mode, which start their own servers: two replicas of a chat
  model, and a Whisper model (`speech`: the audio tests use it, then a test kills that gateway
  with SIGKILL, to show that its vLLM server dies with it).

The chat server also serves a LoRA adapter (`sql`), and the spawned chat model may load
adapters at runtime. A second tiny-chat server listens on 127.0.0.2 with the chat server's port:
two "pods" of one model for the DNS discovery test. That makes eight servers, the budget at
once, so later ones take a place that was given back: when the discovery test is done, the pod
makes way for the BLIP-2 vision server (it starts then, in the background, and the vision tests
stop it when done); the on-demand tests after those start one server at a time.

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
VISION_ARGS: dict[str, object] = {"max-model-len": 512}  # BLIP-2: one image per prompt
SPEECH_ARGS: dict[str, object] = {"max-model-len": 128}  # the tiny Whisper's context
# vLLM's own limit on an audio upload, below the speech gateway's body limit: which one answers
# depends on the size (tests/integration/test_media.py).
SPEECH_ENV = {"VLLM_MAX_AUDIO_CLIP_FILESIZE_MB": "1"}
SPEECH_MAX_BODY = 2 * 1024 * 1024

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
class LateServer:
    """A server that holds a place in the budget only while a test needs it."""

    name: str
    url: str
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None  # under its reaper

    @property
    def log(self) -> Path:
        return ARTIFACTS / f"vllm-{self.name}.log"

    def start(self) -> None:
        """Start it (or start it again, once it is gone); a running one is left as it is."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = _launch(self.command, self.log, self.env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def wait_ready(self, model: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not _serves(self.url, model):
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} is not running; see {self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout}s")
            time.sleep(1)
        return self.url


@dataclass
class VllmRig:
    urls: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    spawned: dict[str, GatewayProcess] = field(default_factory=dict)
    started: bool = False
    late: dict[str, LateServer] = field(default_factory=dict)  # "pod", "vision"

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
                cmd = spec.command(port)
                self.procs.append(_launch(cmd, ARTIFACTS / f"vllm-{name}.log", dict(spec.env)))
                self.urls[name] = f"http://127.0.0.1:{port}"
        chat_port = int(self.urls["tiny-chat"].rsplit(":", 1)[1])
        kind, args = BACKENDS["tiny-chat"]
        pod = spec_for("tiny-chat", kind, args, core=1)
        pod_command = pod.command(chat_port, host=POD_HOST)
        pod_url = f"http://{POD_HOST}:{chat_port}"
        self.late["pod"] = LateServer("tiny-chat-pod", pod_url, pod_command, dict(pod.env))
        vision = spec_for("tiny-vision", "vision", VISION_ARGS, core=0)
        port = free_port()
        vision_url = f"http://127.0.0.1:{port}"
        self.late["vision"] = LateServer(
            "tiny-vision", vision_url, vision.command(port), dict(vision.env)
        )
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
        speech = _spawned("tiny-whisper", "audio", ["whisper-1"], core=1, **SPEECH_ARGS)
        speech["vllm"]["env"].update(SPEECH_ENV)  # type: ignore[index]
        self._spawn_gateway("speech", [speech], max_body_bytes=SPEECH_MAX_BODY)

    @property
    def pod(self) -> subprocess.Popen[bytes] | None:
        return self.late["pod"].proc

    @property
    def pod_url(self) -> str:
        return self.late["pod"].url

    def start_pod(self) -> None:
        """Start (or start again, once it is gone) the second tiny-chat "pod"."""
        self.late["vision"].stop()
        self.late["pod"].start()

    def stop_pod(self) -> None:
        self.late["pod"].stop()

    def start_vision(self) -> None:
        """In the pod's place: the discovery test calls this when done, ahead of the vision
        tests."""
        self.late["pod"].stop()
        self.late["vision"].start()

    def vision(self) -> str:
        """The vision server's URL, once it serves (started here if nobody did)."""
        self.start_vision()
        return self.late["vision"].wait_ready("tiny-vision", min(READY_TIMEOUT, 290))

    def stop_vision(self) -> None:
        self.late["vision"].stop()

    def _spawn_gateway(
        self, label: str, models: list[dict[str, object]], **settings: object
    ) -> None:
        config = {
            "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
            "log_dir": str(ARTIFACTS / f"spawned-{label}"),
            "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
            "models": models,
            **settings,
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
        if self.pod is not None:
            self.late["pod"].wait_ready("tiny-chat", deadline - time.monotonic())
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
        procs += [late.proc for late in self.late.values() if late.proc is not None]
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
