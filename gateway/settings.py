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
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

API_KEYS_ENV = "VLLM_GATEWAY_API_KEYS"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

# What a `vllm serve` flag value may be in YAML: scalars, lists and JSON objects.
ArgValue = str | int | float | bool | list[Any] | dict[str, Any] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Seconds. Non-streamed generations answer only when done, so first_byte is generous."""

    connect: float = Field(10.0, gt=0)
    first_byte: float = Field(900.0, gt=0)
    idle: float = Field(300.0, gt=0, description="longest gap between two chunks of a stream")


class VllmSpawn(_Strict):
    """How the gateway starts this model's own `vllm serve` (spawn mode)."""

    model: str = Field(min_length=1)
    gpus: list[int] = Field(default_factory=list)
    args: dict[str, ArgValue] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("gpus")
    @classmethod
    def _gpus_distinct(cls, gpus: list[int]) -> list[int]:
        if any(g < 0 for g in gpus):
            raise ValueError("GPU indices are 0 or more")
        if len(set(gpus)) != len(gpus):
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


_GATEWAY_OWNED_FLAGS = frozenset({"host", "port", "served-model-name", "api-key", "model"})


class ModelSettings(_Strict):
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    url: str | None = None
    api_key: SecretStr | None = Field(None, description="key the backend expects (connect mode)")
    vllm: VllmSpawn | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("a backend URL takes no query or fragment")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _one_mode(self) -> ModelSettings:
        if (self.url is None) == (self.vllm is None):
            raise ValueError("give either `url` (a running server) or `vllm` (spawn one)")
        return self

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]


class CorsSettings(_Strict):
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


class GatewaySettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list)
    models: list[ModelSettings] = Field(min_length=1)
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts())
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    cors: CorsSettings | None = None
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of each GPU, for the weight-fit estimate (else nvidia-smi)"
    )
    launcher: list[str] = Field(default_factory=lambda: ["vllm", "serve"], min_length=1)
    log_dir: str = "logs"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

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
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}".replace("\n", " ")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the file must hold a mapping (key: value) at the top"])
    return settings_from_dict(raw, source=str(path), env=env, **overrides)


def settings_from_dict(
    raw: Mapping[str, Any],
    *,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> GatewaySettings:
    data = dict(raw)
    data.update({k: v for k, v in overrides.items() if v is not None})
    env_keys = (os.environ if env is None else env).get(API_KEYS_ENV, "")
    extra_keys = [k.strip() for k in env_keys.split(",") if k.strip()]
    if extra_keys:
        data["api_keys"] = [*(data.get("api_keys") or []), *extra_keys]
    try:
        return GatewaySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from None


def _describe(err: Mapping[str, Any]) -> str:
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown option (check the spelling)"
    return f"{where.lstrip('.') or '(top level)'}: {message}"
