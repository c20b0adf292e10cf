"""Spawn mode's config of one model: the `vllm serve` the gateway starts for it, its GPUs and
its LoRA adapters (``models[].vllm``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.strict import Strict

# What a `vllm serve` flag value may be in YAML: scalars, lists and JSON objects.
ArgValue = str | int | float | bool | list[Any] | dict[str, Any] | None


class LoraSettings(Strict):
    """LoRA adapters on this base model: each is a model name of its own."""

    adapters: dict[str, str] = Field(
        default_factory=dict, description="adapter name -> path, served from the start"
    )
    max_rank: int = Field(16, ge=1, description="the largest adapter rank: vLLM's --max-lora-rank")
    runtime: bool = Field(
        False,
        description="adapters may be loaded and unloaded while it runs "
        "(`POST /admin/models/{base}/adapters`)",
    )


class VllmSpawn(Strict):
    """How the gateway starts this model's own `vllm serve` (spawn mode)."""

    model: str = Field(
        min_length=1, description="what `vllm serve` loads: a Hugging Face id or a local path"
    )
    replicas: int = Field(1, ge=1, le=64, description="servers of this model, each its own GPUs")
    gpus: list[int] | list[list[int]] = Field(
        default_factory=list,
        description="GPUs of the model (CUDA_VISIBLE_DEVICES; tensor parallel defaults to their "
        "count), split evenly between replicas; or one list per replica, `[[0], [0]]` for two "
        "slices of GPU 0",
    )
    args: dict[str, ArgValue] = Field(
        default_factory=dict,
        description="any `vllm serve` flag, without dashes: `true` is a bare switch, `false` "
        "leaves it out, a list gives several values, a mapping becomes JSON",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="environment variables of the server"
    )
    lora: LoraSettings | None = Field(None, description="LoRA adapters on this model")
    listen: Literal["tcp", "unix"] | None = Field(
        None,
        description="unix: a socket only the gateway's user may open (the default with "
        "`on_demand.unload: sleep`, whose dev endpoints take no key); tcp: a loopback port",
    )

    @field_validator("gpus")
    @classmethod
    def _gpus_valid(cls, gpus: list[int] | list[list[int]]) -> list[int] | list[list[int]]:
        for group in _groups(gpus):
            if any(g < 0 for g in group):
                raise ValueError("GPU indices are 0 or more")
            if len(set(group)) != len(group):
                raise ValueError("a GPU is listed twice")
        return gpus

    @field_validator("args")
    @classmethod
    def _args_are_bare_flags(cls, args: dict[str, ArgValue]) -> dict[str, ArgValue]:
        for flag in args:
            if flag.startswith("-"):
                raise ValueError(f"write flags without dashes: {flag!r} -> {flag.lstrip('-')!r}")
            if flag in _GATEWAY_OWNED_FLAGS:
                raise ValueError(f"{flag!r} is set by the gateway; leave it out")
        return args

    @model_validator(mode="after")
    def _gpus_fit_replicas(self) -> VllmSpawn:
        self.replica_gpus()
        return self

    def replica_gpus(self) -> list[list[int]]:
        """The GPUs of each replica."""
        if self.gpus and isinstance(self.gpus[0], list):
            groups = _groups(self.gpus)
            if len(groups) != self.replicas:
                raise ValueError(f"gpus has {len(groups)} lists for {self.replicas} replicas")
            return groups
        flat = [g for g in self.gpus if isinstance(g, int)]
        if len(flat) % self.replicas:
            raise ValueError(
                f"{len(flat)} GPUs do not split evenly between {self.replicas} replicas; "
                "give one list per replica"
            )
        share = len(flat) // self.replicas
        return [flat[i * share : (i + 1) * share] for i in range(self.replicas)]


def _groups(gpus: list[int] | list[list[int]]) -> list[list[int]]:
    """Per-replica lists as they are; a flat list as one group."""
    if gpus and isinstance(gpus[0], list):
        return [list(group) for group in gpus if isinstance(group, list)]
    return [[g for g in gpus if isinstance(g, int)]]


_GATEWAY_OWNED_FLAGS = frozenset({"host", "port", "served-model-name", "api-key", "model"})
