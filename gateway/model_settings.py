"""The config of one model: where it runs (a URL, or the `vllm serve` the gateway spawns), how
it is checked, and what it may do (LoRA adapters, on-demand starts). ``gateway.settings`` holds
the file as a whole."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from backends.health import HealthPolicy
from backends.supervisor import SpawnHealth
from gateway.spawn_settings import VllmSpawn
from gateway.strict import FieldProblems, Strict
from gateway.traffic.queue_settings import QueueSettings
from gateway.traffic.settings import REASONS, FallbackReason, ModelTimeouts

_CONNECT, _SPAWN = HealthPolicy(), SpawnHealth()


class HealthSettings(Strict):
    """Active checks (every replica's /health) and passive ejection (failed requests).

    A server the gateway spawns is restarted when it fails its checks, one it connects to is
    only taken out of rotation, so the two modes have their own defaults."""

    # Unset fields stay None here; ``policy`` and ``spawn_checks`` fill in each mode's own.

    interval: float = Field(
        _CONNECT.interval, gt=0, description="seconds between two checks of a replica"
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description=f"seconds a check may take; default {_CONNECT.timeout:g} in connect mode, "
        f"{_SPAWN.timeout:g} in spawn mode",
    )
    unhealthy_threshold: int | None = Field(
        None,
        ge=1,
        description="failed checks in a row that take a replica out (connect mode, default "
        f"{_CONNECT.unhealthy_threshold}) or restart its server (spawn mode, default "
        f"{_SPAWN.failures})",
    )
    healthy_threshold: int | None = Field(
        None,
        ge=1,
        description="connect mode: passed checks in a row (/health and the model list) that "
        f"admit a replica again, default {_CONNECT.healthy_threshold}; spawn mode admits a "
        "server once it answers both, so there it is an error",
    )
    eject_after: int = Field(
        3, ge=1, description="failed requests in a row (refused, reset, 5xx) that eject a replica"
    )
    eject_seconds: float = Field(10.0, gt=0, description="how long an ejected replica stays out")

    def policy(self) -> HealthPolicy:
        """Connect mode's checks: what the config sets, connect mode's defaults for the rest."""
        return HealthPolicy(
            interval=self.interval,
            timeout=_CONNECT.timeout if self.timeout is None else self.timeout,
            unhealthy_threshold=self.unhealthy_threshold or _CONNECT.unhealthy_threshold,
            healthy_threshold=self.healthy_threshold or _CONNECT.healthy_threshold,
        )

    def spawn_checks(self) -> SpawnHealth:
        """Spawn mode's checks: what the config sets, spawn mode's defaults for the rest."""
        return SpawnHealth(
            interval=self.interval,
            timeout=_SPAWN.timeout if self.timeout is None else self.timeout,
            failures=self.unhealthy_threshold or _SPAWN.failures,
        )


class OnDemandCosts(Strict):
    """Seconds, as measured on the GPU the model runs on (the gateway's own measurements
    replace each one once it has seen it)."""

    start: float | None = Field(None, gt=0, description="a cold start, to the first ready server")
    wake_1: float | None = Field(None, gt=0, description="a wake after a level-1 sleep")
    wake_2: float | None = Field(None, gt=0, description="a wake after a level-2 sleep")
    sleep_1: float | None = Field(
        None,
        gt=0,
        description="falling asleep at level 1 (the first time after a start copies the "
        "weights to host memory and takes longest)",
    )
    sleep_2: float | None = Field(None, gt=0, description="falling asleep at level 2")
    stop: float | None = Field(None, gt=0, description="ending its servers")


class OnDemandSettings(Strict):
    """Spawn mode only: started by the first request, stopped when idle (seconds)."""

    idle_ttl: float = Field(
        300.0, gt=0, description="seconds after its last response ends before it is unloaded"
    )
    start_timeout: float = Field(
        900.0, gt=0, description="longest a request waits for a start (then 503, Retry-After)"
    )
    max_waiting: int = Field(
        256,
        ge=1,
        description="deprecated: `queue.max_waiting`, which bounds the same queue (this "
        "applies while that is unset; both is an error)",
    )
    min_resident: float = Field(
        30.0, ge=0, description="seconds any started model stays before a swap may unload it"
    )
    drain_timeout: float = Field(
        120.0, ge=0, description="how long an unload waits for requests in flight, then cuts them"
    )
    unload: Literal["stop", "sleep"] = Field(
        "stop",
        description="how an idle or swapped-out model is unloaded: stop its servers, or sleep "
        "(vLLM's sleep mode, GPU only: the process lives on, its GPU memory is freed)",
    )
    sleep_level: Literal[1, 2, "auto"] = Field(
        1,
        description="with `unload: sleep`: 1 moves the weights to host memory and drops the KV "
        "cache (wakes fastest), 2 drops both (keeps host memory free), auto decides at each "
        "sleep: 1 when the host has memory free for the weights, else 2",
    )
    priority: int = Field(
        0,
        description="`swaps.policy: cost`: a model that outranks another keeps its GPUs while "
        "the other's requests wait (while in use: busy, or used within `min_resident`), and "
        "its requests take their turn first",
    )
    pinned: bool = Field(
        False,
        description="loaded when the gateway starts and never swapped out (with `unload: "
        "sleep` it still sleeps when idle; with `unload: stop` it is never stopped)",
    )
    costs: OnDemandCosts | None = Field(
        None,
        description="first estimates of what its swaps take, until the gateway has measured "
        "its own (shown in /admin/models)",
    )

    @model_validator(mode="after")
    def _sleep_level_needs_sleep(self) -> OnDemandSettings:
        if "sleep_level" in self.model_fields_set and self.unload != "sleep":
            raise FieldProblems(
                [("sleep_level", "applies only with `unload: sleep`; set that or leave it out")]
            )
        return self

    def first_costs(self) -> dict[str, float]:
        """The configured estimates by phase (``backends.swap_costs``)."""
        if self.costs is None:
            return {}
        return {k: v for k, v in self.costs.model_dump().items() if v is not None}


class DiscoverSettings(Strict):
    """Connect mode: every address a DNS name resolves to is a replica (a Kubernetes headless
    Service), re-resolved every ``interval`` seconds."""

    dns: str = Field(
        min_length=3, description="`name:port`, or `http(s)://name:port`; e.g. a headless Service"
    )
    interval: float = Field(5.0, gt=0, description="seconds between two lookups of the name")

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


class PrefixSettings(Strict):
    """For `balance: prefix`: how prompts are remembered and how far load may lean."""

    block_bytes: int = Field(
        256,
        ge=16,
        le=65536,
        description="bytes of rendered prompt per remembered block; a prompt shorter than one "
        "block is balanced by load alone (vLLM's blocks: 16 tokens on GPU, 128 on CPU, "
        "about 4 bytes a token)",
    )
    max_blocks: int = Field(
        16384,
        ge=1,
        description="blocks remembered per replica, oldest forgotten first (about 100 bytes "
        "of memory each); a spawned replica's own KV cache size lowers it",
    )
    load_slack: int = Field(
        2,
        ge=0,
        description="requests in flight beyond the least loaded replica's that the replica "
        "holding the prefix may carry before least outstanding decides",
    )
    load_ratio: float = Field(
        1.5,
        ge=1.0,
        description="and times the least loaded replica's: past both, least outstanding decides",
    )
    kv_events: list[str] = Field(
        default_factory=list,
        description="connect mode: each replica's KV-event endpoint (vLLM's --kv-events-config "
        "publisher, e.g. tcp://host:5557, where vLLM binds tcp://*:5557), in the order of "
        "`urls`; spawn mode turns them on itself. Needs the `kv-events` extra",
    )
    kv_events_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="discovered replicas (`discover`): the port each pod's vLLM publishes its "
        "KV-cache events on (--kv-events-config endpoint tcp://*:PORT); the gateway subscribes "
        "at each pod's address as it joins. Needs the `kv-events` extra",
    )


class ModelSettings(Strict):
    """One model clients call by name: a running server (connect mode), the servers a DNS name
    resolves to, or the servers the gateway spawns."""

    name: str = Field(
        min_length=1, description="what clients send as `model`; the backend is served this name"
    )
    aliases: list[str] = Field(
        default_factory=list, description="other names for it; the backend sees the canonical one"
    )
    url: str | None = Field(None, description="connect mode: the URL of a running vLLM server")
    urls: list[str] | None = Field(
        None, min_length=1, description="connect mode: several replicas of it"
    )
    api_key: SecretStr | None = Field(
        None, description="connect mode: the key those servers expect, if any"
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="or the environment variable that holds it (a Kubernetes Secret, say)",
    )
    vllm: VllmSpawn | None = Field(None, description="spawn mode: the gateway runs `vllm serve`")
    discover: DiscoverSettings | None = Field(
        None, description="connect mode: every address a DNS name resolves to is a replica"
    )
    balance: Literal["least_outstanding", "vllm_metrics", "affinity", "prefix"] = Field(
        "least_outstanding",
        description="how a replica is chosen: fewest requests in flight; vLLM's own load "
        "(`running + 2 waiting + 4 kv_cache_usage`, scraped every second); affinity, a "
        "rendezvous hash of the body's `user` (else `affinity_header`); or prefix, the replica "
        "most likely to hold the prompt's prefix, within a load bound (docs/routing.md)",
    )
    prefix: PrefixSettings = Field(
        default_factory=lambda: PrefixSettings(), description="for balance: prefix"
    )
    affinity_header: str = Field(
        "x-session-id",
        description="with `balance: affinity`: the header hashed when the body has no `user`",
    )
    health: HealthSettings = Field(
        default_factory=lambda: HealthSettings(), description="health checks and ejection"
    )
    on_demand: OnDemandSettings | None = Field(
        None, description="spawn mode: started by its first request, unloaded when idle"
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="connect mode: LoRA adapters the backend serves, so keys may name them "
        "(others are learned from its /v1/models all the same)",
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        description="models tried in turn when this one cannot answer for a reason in "
        "`fallback_on`, never once a byte of its answer went out; each a configured model's "
        "name, alias or adapter, followed by its own fallbacks (docs/traffic.md)",
    )
    fallback_on: list[FallbackReason] = Field(
        default_factory=lambda: list(REASONS),
        description="what falls back: unavailable (no replica ready; or not started, asleep "
        "or restarting while a fallback is ready), overloaded (a queue is full, or vLLM "
        "answered 429 or 503), timeout (no first byte within `timeouts.first_byte`), "
        "context_length (vLLM refused the prompt as too long: only to a longer max-model-len)",
    )
    adapter_fallbacks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="a LoRA adapter of this model -> its own fallbacks; an adapter falls back "
        "only to these, never to its base model's `fallbacks`",
    )
    timeouts: ModelTimeouts = Field(
        default_factory=lambda: ModelTimeouts(),
        description="this model's own `timeouts`, key by key (connect, first_byte, idle)",
    )
    queue: QueueSettings | None = Field(
        None,
        description="its queue in the gateway: requests at once, and how many wait, how long "
        "(docs/traffic.md)",
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

    @field_validator("fallbacks", "fallback_on")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a name is listed twice")
        return names

    @field_validator("adapter_fallbacks")
    @classmethod
    def _each_once_per_adapter(cls, lists: dict[str, list[str]]) -> dict[str, list[str]]:
        for adapter, names in lists.items():
            if len(set(names)) != len(names):
                raise ValueError(f"{adapter}: a name is listed twice")
        return lists

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
        if self.prefix.kv_events and len(self.prefix.kv_events) != len(self.endpoints):
            raise ValueError("`prefix.kv_events` takes one endpoint per URL (connect mode)")
        if self.prefix.kv_events_port is not None and self.discover is None:
            raise ValueError(
                "`prefix.kv_events_port` is for discovered replicas (`discover`); with `urls`, "
                "list each one's endpoint in `prefix.kv_events`"
            )
        if self.on_demand is not None and self.vllm is None:
            raise ValueError("`on_demand` needs `vllm`: the gateway starts only what it spawns")
        if problems := self._ignored():
            raise FieldProblems(problems)
        return self

    def _ignored(self) -> list[tuple[str, str]]:
        """Options this model's other settings would leave without effect: errors, so a config
        never says something the gateway does not do."""
        problems = []
        if self.vllm is not None and self.api_key is not None:
            problems.append(
                ("api_key", "is for connect mode: spawned servers get a key of their own")
            )
        if self.vllm is not None and self.health.healthy_threshold is not None:
            problems.append(
                (
                    "health.healthy_threshold",
                    "is for connect mode: a spawned server is admitted as soon as /health and "
                    "its model list answer; leave it out",
                )
            )
        problems += self._queue_ignored()
        if "prefix" in self.model_fields_set and self.balance != "prefix":
            problems.append(
                ("prefix", "applies only with `balance: prefix`; set that or leave it out")
            )
        if "affinity_header" in self.model_fields_set and self.balance != "affinity":
            problems.append(
                (
                    "affinity_header",
                    "applies only with `balance: affinity`; set that or leave it out",
                )
            )
        if "fallback_on" in self.model_fields_set and not self.falls_back:
            problems.append(("fallback_on", "applies only with `fallbacks` or `adapter_fallbacks`"))
        problems += [
            (
                f"adapter_fallbacks.{adapter}",
                "is not an adapter this model names (`vllm.lora.adapters`, or `adapters`)",
            )
            for adapter in self.adapter_fallbacks
            if adapter not in self.adapter_names
        ]
        return problems

    def _queue_ignored(self) -> list[tuple[str, str]]:
        queue, on_demand = self.queue, self.on_demand
        if queue is None:
            return []
        problems = []
        if on_demand is not None:
            both = "max_waiting" in on_demand.model_fields_set & queue.model_fields_set
            if both:
                problems.append(
                    ("on_demand.max_waiting", "is now `queue.max_waiting`; give only that")
                )
        elif queue.max_in_flight is None:
            problems += [
                (f"queue.{name}", "nothing waits without `queue.max_in_flight` (or `on_demand`)")
                for name in ("max_waiting", "max_wait")
                if name in queue.model_fields_set
            ]
        return problems

    @property
    def falls_back(self) -> bool:
        """Some request for it (or one of its adapters) may go to another model."""
        return bool(self.fallbacks) or any(self.adapter_fallbacks.values())

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
