"""What it takes to start one vLLM server: a plain, immutable description and its command line.

The gateway turns its YAML config into these; ``plan`` prints them; the supervisor runs them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

API_KEY_ENV = "VLLM_API_KEY"  # read by vLLM's server as its --api-key
GATEWAY_ENV_PREFIX = "VLLM_GATEWAY_"  # the gateway's own settings; its servers get none


@dataclass(frozen=True)
class VllmSpec:
    name: str  # the served model name, the one the gateway routes by
    model: str  # HF id or local path
    launcher: tuple[str, ...] = ("vllm", "serve")
    gpus: tuple[int, ...] = ()
    args: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    replica: int | None = None  # this server's index among the model's replicas, if several
    unix_socket: bool = False  # listen on a unix socket (vLLM's --uds), not on a TCP port

    @property
    def label(self) -> str:
        """Unique per server: the model's name, with the replica's index when it has several."""
        return self.name if self.replica is None else f"{self.name}#{self.replica}"

    @property
    def tensor_parallel_size(self) -> int:
        explicit = self.args.get("tensor-parallel-size")
        if explicit is not None:
            return int(explicit)
        return max(1, len(self.gpus))

    @property
    def memory_share(self) -> float:
        """vLLM's fraction of each GPU it may take (its own default is 0.9)."""
        return float(self.args.get("gpu-memory-utilization", 0.9))

    def command(self, port: int, host: str = "127.0.0.1", uds: str | None = None) -> list[str]:
        """``uds``: the unix socket to listen on, instead of ``host`` and ``port``. The backend
        key is not here: every local user can read a command line (``environment`` has it)."""
        launcher = list(self.launcher)
        if launcher[-1] == "serve":  # `vllm serve MODEL` takes the model positionally
            cmd = [*launcher, self.model]
        else:
            cmd = [*launcher, "--model", self.model]
        cmd += ["--served-model-name", self.name]
        cmd += ["--uds", uds] if uds else ["--host", host, "--port", str(port)]
        args = dict(self.args)
        if len(self.gpus) > 1:
            args.setdefault("tensor-parallel-size", len(self.gpus))
        for flag, value in args.items():
            cmd += render_flag(flag, value)
        return cmd

    def environment(
        self, base: Mapping[str, str] | None = None, api_key: str | None = None
    ) -> dict[str, str]:
        """The server's environment. ``api_key`` goes to vLLM's ``VLLM_API_KEY`` (the same
        check as ``--api-key``), which only the server's own user can read; without one, a
        ``VLLM_API_KEY`` inherited from the gateway's environment is dropped, and so is the
        gateway's own configuration (``VLLM_GATEWAY_*``: its client keys among them)."""
        inherited = os.environ if base is None else base
        env = {k: v for k, v in inherited.items() if not k.startswith(GATEWAY_ENV_PREFIX)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        env.update(self.env)
        env.pop(API_KEY_ENV, None)
        if api_key:
            env[API_KEY_ENV] = api_key
        return env


def render_flag(flag: str, value: Any) -> list[str]:
    """`--flag value` as vLLM's argparse wants it.

    True is a bare switch; False and None leave the flag out; a list gives several values
    (`--served-model-name a b`); a mapping becomes JSON (`--limit-mm-per-prompt '{"image":4}'`).
    """
    option = f"--{flag}"
    if value is True:
        return [option]
    if value is False or value is None:
        return []
    if isinstance(value, Mapping):
        return [option, json.dumps(value, separators=(",", ":"))]
    if isinstance(value, list | tuple):
        return [option, *(str(v) for v in value)]
    return [option, str(value)]


def shell_line(cmd: list[str]) -> str:
    import shlex

    return shlex.join(cmd)
