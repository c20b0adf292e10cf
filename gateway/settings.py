"""The gateway's configuration: one YAML file, validated once at start-up.

Every problem in a file is reported at once, one line each, naming the field
(``models[2].url: not an http(s) URL``), so a user fixes a config in one pass.
Unknown keys are errors too: a misspelt option must not be silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from gateway import waits
from gateway.access_settings import CorsSettings, KeySettings
from gateway.limits.settings import LimitsStoreSettings
from gateway.model_settings import ModelSettings
from gateway.strict import FieldProblems, Strict
from gateway.swap_settings import SwapSettings
from gateway.tracing_settings import TracingSettings
from gateway.traffic.fallback_plan import fallback_problems

API_KEYS_ENV = "VLLM_GATEWAY_API_KEYS"
MONITOR_KEYS_ENV = "VLLM_GATEWAY_MONITOR_KEYS"  # keys that may read the ops surfaces
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Keys that were renamed: the old name still works, with a warning, until it is removed.
RENAMED = {"max_header_bytes": "max_head_bytes"}


class Timeouts(Strict):
    """Seconds. Non-streamed generations answer only when done, so first_byte is generous."""

    connect: float = Field(
        10.0,
        gt=0,
        description="to open a connection to a backend: the relay's, and the gateway's own "
        "calls (readiness and health checks, load scrapes, sleep and wake, adapters), which "
        "stay within their own limits too (a check's `health.timeout`, a scrape's second)",
    )
    first_byte: float = Field(
        900.0,
        gt=0,
        description="from sending a request to the backend's first byte (a whole non-streamed "
        "generation); a request held for an on-demand start does not count that wait",
    )
    idle: float = Field(300.0, gt=0, description="longest gap between two chunks of a stream")
    client: float = Field(
        60.0, gt=0, description="time a client has to send its whole request, head and body"
    )


class RetryAfter(Strict):
    """Seconds a client is told to wait (Retry-After) when its model cannot serve it yet."""

    loading: int = Field(
        waits.RETRY_LOADING,
        ge=1,
        description="its server is starting, restarting or waking, or an on-demand model's "
        "queue is full while it starts (429); a failed on-demand start answers its backoff",
    )
    no_replica: int = Field(
        waits.RETRY_NO_REPLICA, ge=1, description="no replica is ready and none is on its way"
    )


class MetricsSettings(Strict):
    """What /metrics counts per request beyond model, endpoint and status."""

    requests_by_key: bool = Field(
        False,
        description="`vllm_gateway_requests_total` gets a `key` label too: a series per key, "
        "model, endpoint and status (tokens are always counted by key)",
    )


class GatewaySettings(Strict):
    """The whole file. The command line's --host, --port, --workers, --log-level and
    --log-format win over it."""

    host: str = Field("127.0.0.1", description="the address the gateway listens on")
    port: int = Field(8000, ge=0, le=65535, description="its port")
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="relay processes sharing the port; above 1, one more process is the "
        "control plane (servers, health, on-demand starts, reload, the admin API) and the "
        "workers relay (docs/scale-out.md); a change needs a restart",
    )
    api_keys: list[KeySettings] = Field(
        default_factory=list,
        description="keys clients send (`Authorization: Bearer` or `x-api-key`); a plain string "
        "is a key named config-1, config-2, ...; env VLLM_GATEWAY_API_KEYS adds env-1, ... and "
        "VLLM_GATEWAY_MONITOR_KEYS monitor keys",
    )
    keys_file: str | None = Field(
        None,
        description="a YAML file of more keys (`keys:`), re-read when it changes and on SIGHUP",
    )
    watch_config: bool = Field(
        False,
        description="reload this config when its file changes (once two looks a second apart "
        "agree), as `kill -HUP` and `POST /admin/reload` do",
    )
    open_endpoints: list[Literal["metrics", "status", "backend_metrics"]] = Field(
        default_factory=list,
        description="ops surfaces served without a key (/health always is; /admin/* never)",
    )
    models: list[ModelSettings] = Field(min_length=1, description="the models it serves")
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts(), description="in seconds")
    retry_after: RetryAfter = Field(
        default_factory=lambda: RetryAfter(), description="Retry-After seconds on a 503"
    )
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, gt=0, description="a larger request body is refused with 413"
    )
    max_head_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="a larger request head (request line and headers) is refused with 431; "
        "formerly `max_header_bytes`",
    )
    cors: CorsSettings | None = Field(None, description="no CORS headers unless configured")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of each GPU, for the weight-fit estimate (else nvidia-smi)"
    )
    launcher: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"],
        min_length=1,
        description="the command that starts a spawned server; one that starts with `python` "
        "runs under the gateway's interpreter (CPU build: `[python, -m, "
        "vllm.entrypoints.openai.api_server]`)",
    )
    log_dir: str = Field("logs", description="one log file per spawned server")
    keep_backends: float = Field(
        120.0,
        ge=0,
        description="seconds spawned servers wait for a restarted gateway to adopt them; "
        "0 stops them with the gateway",
    )
    state_dir: str | None = Field(
        None,
        description="where spawned servers are recorded for adoption (default: log_dir/state)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="of the gateway's own log"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or one JSON object per line"
    )
    access_log: bool | None = Field(
        None,
        description="one line per request on stderr; unset, it is written when `log_level` is "
        "info or debug, `true` writes it at any level, `false` never",
    )
    stream_usage: Literal["client", "always"] = Field(
        "client",
        description="count tokens of streams that asked for usage (client), or of every stream",
    )
    tracing: TracingSettings | None = Field(
        None, description="OpenTelemetry traces (docs/tracing.md); none at all when absent"
    )
    metrics: MetricsSettings = Field(
        default_factory=lambda: MetricsSettings(), description="what /metrics counts"
    )
    limits_store: LimitsStoreSettings | None = Field(
        None,
        description="where per-key limits are counted: unset, in the gateway's memory, one "
        "table for all the workers of a host; a Redis URL (docs/scale-out.md) shares them "
        "between gateway replicas",
    )
    swaps: SwapSettings = Field(
        default_factory=lambda: SwapSettings(),
        description="how on-demand models that share GPUs take turns",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _name_plain_keys(cls, keys: Any) -> Any:
        if not isinstance(keys, list):
            return keys
        return [
            {"name": f"config-{i}", "key": key} if isinstance(key, str) else key
            for i, key in enumerate(keys, 1)
        ]

    @model_validator(mode="after")
    def _names_unique(self) -> GatewaySettings:
        owner: dict[str, int] = {}
        problems = []
        for i, model in enumerate(self.models):
            for name in model.names:
                if name in owner and owner[name] != i:
                    first = self.models[owner[name]].name
                    problems.append(
                        f"models[{i}]: name {name!r} is already used by "
                        f"models[{owner[name]}] ({first})"
                    )
                owner.setdefault(name, i)
        for i, model in enumerate(self.models):
            for adapter in model.adapter_names:
                if adapter in owner:
                    problems.append(
                        f"models[{i}]: adapter {adapter!r} is already the name of "
                        f"models[{owner[adapter]}] ({self.models[owner[adapter]].name})"
                    )
                owner.setdefault(adapter, i)
        runtime = self.runtime_adapters
        named: set[str] = set()
        for entry in self.api_keys:
            if entry.name in named:
                problems.append(f"api_keys.{entry.name}: the name is used twice")
            named.add(entry.name)
            problems += [
                f"api_keys.{entry.name}: model {name!r} is not configured"
                for name in entry.models or []
                if name not in owner and not runtime  # it may be a runtime adapter's name
            ]
        problems += fallback_problems(self.models, self.canonical_names)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _priority_needs_cost(self) -> GatewaySettings:
        if self.swaps.policy == "cost":
            return self
        problems = [
            (f"models[{i}].on_demand.priority", "applies only with `swaps.policy: cost`")
            for i, m in enumerate(self.models)
            if m.on_demand is not None and "priority" in m.on_demand.model_fields_set
        ]
        if problems:
            raise FieldProblems(problems)
        return self

    _deprecations: tuple[str, ...] = PrivateAttr(default=())
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def raw(self) -> dict[str, Any]:
        """The mapping it was read from (the file's, before the command line's overrides):
        what a control plane hands its workers (``gateway.workers``), so that each runs the
        very config in force, not whatever the file says by the time it starts."""
        return self._raw

    @property
    def deprecations(self) -> tuple[str, ...]:
        """Old names this config used, one line each: they work, but will not for ever."""
        return self._deprecations

    @property
    def writes_access_log(self) -> bool:
        if self.access_log is None:
            return self.log_level in ("info", "debug")
        return self.access_log

    @property
    def canonical_names(self) -> dict[str, str]:
        """Every model name and alias -> the name of the model it stands for; an adapter the
        config names stands for itself (it is a model of its own)."""
        names = {name: model.name for model in self.models for name in model.names}
        names.update({a: a for model in self.models for a in model.adapter_names})
        return names

    @property
    def runtime_adapters(self) -> bool:
        """Whether adapters may be loaded at runtime (so a key may name one not yet loaded)."""
        return any(m.vllm and m.vllm.lora and m.vllm.lora.runtime for m in self.models)


def state_path(settings: GatewaySettings) -> Path:
    """The state directory: `state_dir`, else `state` under `log_dir`."""
    return Path(settings.state_dir or Path(settings.log_dir) / "state")
