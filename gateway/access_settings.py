"""Who may call the gateway: API keys (in the config, the environment or a keys file) and
CORS for browsers."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from gateway.strict import FieldProblems, Strict
from gateway.traffic.priorities import FIRST, LAST, PRIORITY_HEADER, PriorityValue, number


class KeySettings(Strict):
    """One API key: whose it is, what it may reach, how fast. Logs and metrics show the name."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9._@-]{1,64}$",
        description="what logs and metrics show; unique across config, environment, keys file",
    )
    key: SecretStr | None = Field(None, description="the key itself")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description='or its SHA-256 in hex (`printf %s "$KEY" | sha256sum`)',
    )
    models: list[str] | None = Field(
        None, description="the models (names, aliases, adapters) it may call; all when absent"
    )
    requests_per_minute: int | None = Field(
        None, gt=0, description="a token bucket; over it, 429 with Retry-After"
    )
    max_concurrent: int | None = Field(
        None, gt=0, description="requests in flight at once; over it, 429 with Retry-After"
    )
    max_wait: float | None = Field(
        None,
        gt=0,
        description="seconds its requests wait at most for an on-demand model to start or wake "
        "(503 with the estimate at once when that is not enough); a request's "
        "`x-vllm-gateway-max-wait` header overrides it",
    )
    admin: bool = Field(False, description="sees and does everything, /admin/* included")
    monitor: bool = Field(False, description="reads the ops surfaces (metrics, status)")
    priority: PriorityValue = Field(
        "default",
        description="where its requests wait in a model's queue: `interactive` (-10), "
        f"`default` (0), `batch` (10) or an integer from {FIRST} to {LAST}; lower goes first "
        "(and is what vLLM gets with `--scheduling-policy priority`)",
    )
    priority_range: tuple[PriorityValue, PriorityValue] | None = Field(
        None,
        description=f"`[first, last]`: the priorities a request may ask for with the "
        f"`{PRIORITY_HEADER.decode()}` header; default: its `priority` or any later one",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="its share of a model's turns among keys of the same priority that wait "
        "there: weight 2 goes twice for each turn of weight 1",
    )

    @model_validator(mode="after")
    def _one_secret(self) -> KeySettings:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give either `key` or `sha256` (the key's SHA-256, in hex)")
        if self.admin and self.models is not None:
            raise ValueError("an admin key sees every model: leave out `models`")
        first, last = self.priorities
        if first > last:
            raise FieldProblems([("priority_range", "write it `[first, last]`: lower first")])
        if not first <= number(self.priority) <= last:
            raise FieldProblems([("priority", "lies outside its own `priority_range`")])
        return self

    @property
    def priorities(self) -> tuple[int, int]:
        """The first and the last priority its requests may ask for."""
        if self.priority_range is None:
            return number(self.priority), LAST
        return number(self.priority_range[0]), number(self.priority_range[1])


class KeysFile(Strict):
    """A keys file: re-read on change and on SIGHUP, so keys rotate without a restart."""

    keys: list[KeySettings] = Field(
        default_factory=list, description="API keys, one entry each (`sha256:` keeps a key hashed)"
    )


class CorsSettings(Strict):
    """Named as vLLM's own flags name them. No CORS headers at all unless this is configured."""

    allowed_origins: list[str] = Field(
        default_factory=list, description="origins that may call from a browser; `*` for any"
    )
    allowed_methods: list[str] = Field(
        default_factory=lambda: ["*"], description="methods a preflight allows"
    )
    allowed_headers: list[str] = Field(
        default_factory=lambda: ["*"], description="headers a preflight allows"
    )
    allow_credentials: bool = Field(
        False, description="cookies and credentials allowed (not with origin `*`)"
    )

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsSettings:
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError("allowed_origins '*' cannot be combined with allow_credentials")
        return self
