"""From the config's spawn-mode models to the supervisor's backend specs."""

from __future__ import annotations

import sys

from backends.spec import VllmSpec
from gateway.settings import GatewaySettings


def backend_specs(settings: GatewaySettings) -> list[VllmSpec]:
    return [
        VllmSpec(
            name=model.name,
            model=model.vllm.model,
            launcher=launcher(settings.launcher),
            gpus=tuple(model.vllm.gpus),
            args=dict(model.vllm.args),
            env=dict(model.vllm.env),
        )
        for model in settings.models
        if model.vllm is not None
    ]


def launcher(configured: list[str]) -> tuple[str, ...]:
    """A launcher that starts with `python` runs under the gateway's own interpreter, the one
    whose environment has vLLM installed, whatever `python` means on the PATH."""
    if configured[0] in ("python", "python3"):
        return (sys.executable, *configured[1:])
    return tuple(configured)
