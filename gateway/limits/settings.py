"""`limits_store`: where per-key limits are counted (docs/scale-out.md, "Limits across workers
and replicas").

Unset, the gateway counts in its own memory (one table for all the workers of a host). A Redis
URL shares the counters between gateway replicas. Its password never goes into the config or the
URL: it comes from the environment (``password_env``), read once at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator

from gateway.strict import Strict

LIMITS_STORE_ENV = "VLLM_GATEWAY_LIMITS_STORE"  # the URL; wins over the file's (Kubernetes)
PASSWORD_ENV = "VLLM_GATEWAY_REDIS_PASSWORD"
SCHEMES = ("redis", "rediss", "unix")


class LimitsStoreSettings(Strict):
    """A plain string is the URL (`limits_store: redis://redis:6379/0`)."""

    url: str | None = Field(
        None,
        description="`redis://host:port/db` (`rediss://` for TLS, `unix:///path`): counters "
        "shared by every gateway replica that names the same Redis; unset: in the gateway's "
        f"own memory; env {LIMITS_STORE_ENV} sets it (and wins)",
    )
    on_error: Literal["fail_open", "fail_closed"] = Field(
        "fail_open",
        description="when Redis cannot be reached: `fail_open` lets limited keys' requests "
        "through uncounted, `fail_closed` refuses them with 503 `limits_unavailable`",
    )
    timeout: float = Field(
        0.25,
        gt=0,
        le=10,
        description="seconds one call to Redis may take before it counts as unreachable",
    )
    prefix: str = Field(
        "vllm-gateway",
        pattern=r"^[A-Za-z0-9._:-]{1,64}$",
        description="of every Redis key (each key's counters are named by its name's SHA-256)",
    )
    password_env: str = Field(
        PASSWORD_ENV,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable holding Redis's password (none when unset)",
    )
    _password: SecretStr | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _plain_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (a port that is not a number raises here)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme not in SCHEMES:
            raise ValueError("a Redis URL: redis://host:port/db, rediss://... or unix:///path")
        if parts.password is not None:
            raise ValueError(
                "no password in the URL: put it in the environment (`password_env`, "
                f"default {PASSWORD_ENV})"
            )
        return url

    @property
    def redis(self) -> bool:
        return self.url is not None

    @property
    def password(self) -> SecretStr | None:
        return self._password

    def with_password_from(self, environ: Mapping[str, str]) -> LimitsStoreSettings:
        """A copy holding the password from ``environ``, if it has one."""
        copy = self.model_copy()
        value = environ.get(self.password_env, "")
        copy._password = SecretStr(value) if value else None
        return copy
