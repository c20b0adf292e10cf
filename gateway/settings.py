"""The gateway's configuration: one YAML file, validated once at start-up.

Every problem in a file is reported at once, one line each, naming the field
(``models[2].url: not an http(s) URL``), so a user fixes a config in one pass.
Unknown keys are errors too: a misspelt option must not be silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from gateway import waits
from gateway.model_settings import ModelSettings, Strict

API_KEYS_ENV = "VLLM_GATEWAY_API_KEYS"
MONITOR_KEYS_ENV = "VLLM_GATEWAY_MONITOR_KEYS"  # keys that may read the ops surfaces
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class Timeouts(Strict):
    """Seconds. Non-streamed generations answer only when done, so first_byte is generous."""

    connect: float = Field(10.0, gt=0)
    first_byte: float = Field(900.0, gt=0)
    idle: float = Field(300.0, gt=0, description="longest gap between two chunks of a stream")
    client: float = Field(
        60.0, gt=0, description="time a client has to send its whole request, head and body"
    )


class RetryAfter(Strict):
    """Seconds a client is told to wait (Retry-After) when its model cannot serve it yet."""

    loading: int = Field(
        waits.RETRY_LOADING, ge=1, description="its server is starting, restarting or waking"
    )
    no_replica: int = Field(
        waits.RETRY_NO_REPLICA, ge=1, description="no replica is ready and none is on its way"
    )


class KeySettings(Strict):
    """One API key: whose it is, what it may reach, how fast. Logs and metrics show the name."""

    name: str = Field(pattern=r"^[A-Za-z0-9._@-]{1,64}$")
    key: SecretStr | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="of the key")
    models: list[str] | None = Field(None, description="names or aliases; all when absent")
    requests_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)
    admin: bool = Field(False, description="sees and does everything, /admin/* included")
    monitor: bool = Field(False, description="reads the ops surfaces (metrics, status)")

    @model_validator(mode="after")
    def _one_secret(self) -> KeySettings:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give either `key` or `sha256` (the key's SHA-256, in hex)")
        if self.admin and self.models is not None:
            raise ValueError("an admin key sees every model: leave out `models`")
        return self


class KeysFile(Strict):
    """A keys file: re-read on change and on SIGHUP, so keys rotate without a restart."""

    keys: list[KeySettings] = Field(default_factory=list)


class CorsSettings(Strict):
    """Named as vLLM's own flags name them. No CORS headers at all unless this is configured."""

    allowed_origins: list[str] = Field(default_factory=list)
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsSettings:
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError("allowed_origins '*' cannot be combined with allow_credentials")
        return self


class GatewaySettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[KeySettings] = Field(
        default_factory=list, description="a plain string is a key named config-1, config-2, ..."
    )
    keys_file: str | None = None
    open_endpoints: list[Literal["metrics", "status", "backend_metrics"]] = Field(
        default_factory=list,
        description="ops surfaces served without a key (/health always is; /admin/* never)",
    )
    models: list[ModelSettings] = Field(min_length=1)
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts())
    retry_after: RetryAfter = Field(default_factory=lambda: RetryAfter())
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    cors: CorsSettings | None = None
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of each GPU, for the weight-fit estimate (else nvidia-smi)"
    )
    launcher: list[str] = Field(default_factory=lambda: ["vllm", "serve"], min_length=1)
    log_dir: str = "logs"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = "text"
    access_log: bool = Field(True, description="one line per relayed request, at info level")
    stream_usage: Literal["client", "always"] = Field(
        "client",
        description="count tokens of streams that asked for usage (client), or of every stream",
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
        if problems:
            raise ValueError("; ".join(problems))
        return self

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


class ConfigError(Exception):
    """A configuration that cannot start the gateway; ``problems`` holds one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


def load_settings(
    path: str | Path, env: Mapping[str, str] | None = None, **overrides: Any
) -> GatewaySettings:
    """Read, validate and complete a config file. Keys from the environment are added to it."""
    return settings_from_dict(_read_mapping(path), source=str(path), env=env, **overrides)


def load_keys_file(path: str | Path) -> KeysFile:
    try:
        return KeysFile.model_validate(_read_mapping(path))
    except ValidationError as exc:
        raise ConfigError(str(path), _describe(exc)) from None


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        # libyaml's loader where PyYAML has it: several times faster on a large keys file.
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}".replace("\n", " ")]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the file must hold a mapping (key: value) at the top"])
    return raw


def settings_from_dict(
    raw: Mapping[str, Any],
    *,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> GatewaySettings:
    data = dict(raw)
    data.update({k: v for k, v in overrides.items() if v is not None})
    environ = os.environ if env is None else env
    extra_keys = [
        {"name": f"env-{i}", "key": key} for i, key in enumerate(_listed(environ, API_KEYS_ENV), 1)
    ] + [
        {"name": f"monitor-{i}", "key": key, "monitor": True}
        for i, key in enumerate(_listed(environ, MONITOR_KEYS_ENV), 1)
    ]
    if extra_keys:
        data["api_keys"] = [*(data.get("api_keys") or []), *extra_keys]
    try:
        settings = GatewaySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc)) from None
    return _backend_keys_from(environ, settings, source)


def _backend_keys_from(
    environ: Mapping[str, str], settings: GatewaySettings, source: str
) -> GatewaySettings:
    """Each `api_key_env` read once, at load: a missing variable is a config error, not a
    backend that answers 401 later."""
    models, problems = [], []
    for i, model in enumerate(settings.models):
        if model.api_key_env is not None:
            value = environ.get(model.api_key_env, "")
            if not value:
                problems.append(
                    f"models[{i}].api_key_env: environment variable {model.api_key_env} is not set"
                )
            model = model.model_copy(update={"api_key": SecretStr(value)})
        models.append(model)
    if problems:
        raise ConfigError(source, problems)
    return settings.model_copy(update={"models": models})


def _listed(environ: Mapping[str, str], name: str) -> list[str]:
    """A comma-separated list from the environment, blanks dropped."""
    return [k.strip() for k in environ.get(name, "").split(",") if k.strip()]


def _describe(exc: ValidationError) -> list[str]:
    """One line per problem, each naming its field. Cross-field checks name their own fields."""
    lines = []
    for err in exc.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown option (check the spelling)"
        if where:
            lines.append(f"{where.lstrip('.')}: {message}")
        else:
            lines += message.split("; ")
    return lines
