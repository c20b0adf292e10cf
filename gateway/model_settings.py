"""The config of one model: where it runs (a URL, or the `vllm serve` the gateway spawns), how
it is checked, and what it may do (LoRA adapters, on-demand starts). ``gateway.settings`` holds
the file as a whole."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

# What a `vllm serve` flag value may be in YAML: scalars, lists and JSON objects.
ArgValue = str | int | float | bool | list[Any] | dict[str, Any] | None


class Strict(BaseModel):
    """Unknown keys are errors; settings never change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(Strict):
    """LoRA adapters on this base model: each is a model name of its own."""

    adapters: dict[str, str] = Field(default_factory=dict, description="name -> path, at start")
    max_rank: int = Field(16, ge=1, description="vLLM's --max-lora-rank")
    runtime: bool = Field(False, description="adapters may be loaded and unloaded while it runs")


class VllmSpawn(Strict):
    """How the gateway starts this model's own `vllm serve` (spawn mode)."""

    model: str = Field(min_length=1)
    replicas: int = Field(1, ge=1, le=64)
    gpus: list[int] | list[list[int]] = Field(
        default_factory=list,
        description="GPUs of the model, split evenly between replicas; or one list per replica",
    )
    args: dict[str, ArgValue] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    lora: LoraSettings | None = None
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


class HealthSettings(Strict):
    """Active checks (every replica's /health) and passive ejection (failed requests)."""

    interval: float = Field(5.0, gt=0)
    timeout: float = Field(2.0, gt=0)
    unhealthy_threshold: int = Field(2, ge=1, description="failed checks in a row to take out")
    healthy_threshold: int = Field(2, ge=1, description="passed checks in a row to admit again")
    eject_after: int = Field(3, ge=1, description="failed requests in a row (refused, 5xx)")
    eject_seconds: float = Field(10.0, gt=0)


class OnDemandSettings(Strict):
    """Spawn mode only: started by the first request, stopped when idle (seconds)."""

    idle_ttl: float = Field(300.0, gt=0, description="after the last response ends")
    start_timeout: float = Field(900.0, gt=0, description="longest a request waits for a start")
    max_waiting: int = Field(256, ge=1, description="requests held at once while it starts")
    min_resident: float = Field(30.0, ge=0, description="before a swap may stop it")
    drain_timeout: float = Field(120.0, ge=0, description="a swap waits this long for requests")
    unload: Literal["stop", "sleep"] = Field("stop", description="sleep: vLLM's sleep mode")
    sleep_level: Literal[1, 2] = Field(
        1, description="1: weights to host memory, KV cache dropped; 2: both dropped"
    )


class DiscoverSettings(Strict):
    """Connect mode: every address a DNS name resolves to is a replica (a Kubernetes headless
    Service), re-resolved every ``interval`` seconds."""

    dns: str = Field(
        min_length=3, description="`name:port`, or `http(s)://name:port`; e.g. a headless Service"
    )
    interval: float = Field(5.0, gt=0)

    @field_validator("dns")
    @classmethod
    def _name_and_port(cls, dns: str) -> str:
        parts = urlsplit(dns if "://" in dns else f"http://{dns}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("write `name:port` or `http(s)://name:port`")
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None or parts.path.strip("/") or parts.query or parts.fragment:
            raise ValueError("write `name:port` or `http(s)://name:port`, with the port")
        return dns


class ModelSettings(Strict):
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    url: str | None = None
    urls: list[str] | None = Field(None, min_length=1, description="replicas (connect mode)")
    api_key: SecretStr | None = Field(None, description="key the backend expects (connect mode)")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="or the environment variable that holds it (a Kubernetes Secret, say)",
    )
    vllm: VllmSpawn | None = None
    discover: DiscoverSettings | None = None
    balance: Literal["least_outstanding", "vllm_metrics", "affinity"] = "least_outstanding"
    affinity_header: str = Field(
        "x-session-id", description="for balance: affinity, when the body has no `user`"
    )
    health: HealthSettings = Field(default_factory=lambda: HealthSettings())
    on_demand: OnDemandSettings | None = None
    adapters: list[str] = Field(
        default_factory=list,
        description="connect mode: LoRA adapters the backend serves, so keys may name them "
        "(others are learned from its /v1/models all the same)",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        return None if url is None else _check_url(url)

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str] | None) -> list[str] | None:
        if urls is None:
            return None
        checked = [_check_url(url) for url in urls]
        if len(set(checked)) != len(checked):
            raise ValueError("a URL is listed twice")
        return checked

    @model_validator(mode="after")
    def _one_mode(self) -> ModelSettings:
        if sum(x is not None for x in (self.url, self.urls, self.vllm, self.discover)) != 1:
            raise ValueError(
                "give one of `url` or `urls` (running servers), `discover` (the servers a DNS "
                "name resolves to) or `vllm` (spawn them)"
            )
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give `api_key` or `api_key_env`, not both")
        if self.api_key_env is not None and self.vllm is not None:
            raise ValueError("`api_key_env` is for connect mode: spawned servers get their own")
        if self.adapters and self.vllm is not None:
            raise ValueError("`adapters` is for connect mode; spawn mode: `vllm.lora.adapters`")
        if self.on_demand is not None and self.vllm is None:
            raise ValueError("`on_demand` needs `vllm`: the gateway starts only what it spawns")
        return self

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters the config names on this base model (both modes)."""
        if self.vllm is not None:
            return list(self.vllm.lora.adapters) if self.vllm.lora else []
        return list(self.adapters)

    @property
    def endpoints(self) -> list[str]:
        """The URLs of a connect-mode model's replicas (none in spawn mode)."""
        return [self.url] if self.url is not None else list(self.urls or [])


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError("a backend URL takes no query or fragment")
    return url.rstrip("/")
