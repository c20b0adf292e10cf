"""From the config's spawn-mode models to the supervisor's backend specs."""

from __future__ import annotations

from backends.spec import VllmSpec
from gateway.settings import GatewaySettings


def backend_specs(settings: GatewaySettings) -> list[VllmSpec]:
    return [
        VllmSpec(
            name=model.name,
            model=model.vllm.model,
            launcher=tuple(settings.launcher),
            gpus=tuple(model.vllm.gpus),
            args=dict(model.vllm.args),
            env=dict(model.vllm.env),
        )
        for model in settings.models
        if model.vllm is not None
    ]
