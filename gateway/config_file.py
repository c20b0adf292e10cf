"""Reading a config: the file, the keys the environment adds, renamed and moved options, and
every problem found, one line each, naming its field (``gateway.settings`` holds what the
config is)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from gateway.access_settings import KeysFile
from gateway.limits.settings import LIMITS_STORE_ENV
from gateway.settings import API_KEYS_ENV, MONITOR_KEYS_ENV, RENAMED, GatewaySettings
from gateway.strict import FieldProblems

log = logging.getLogger("vllm_gateway.config")


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
    data, deprecations = _renamed(raw, source)
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
    if store_url := environ.get(LIMITS_STORE_ENV, "").strip():
        store = data.get("limits_store")
        data["limits_store"] = {**_as_mapping(store, "url"), "url": store_url}
    try:
        settings = GatewaySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc)) from None
    settings = _backend_keys_from(environ, settings, source)
    if settings.limits_store is not None:
        store_settings = settings.limits_store.with_password_from(environ)
        settings = settings.model_copy(update={"limits_store": store_settings})
    deprecations += _moved(settings)
    settings._deprecations = tuple(f"{source}: {line}" for line in deprecations)
    settings._raw = dict(raw)
    for line in settings.deprecations:
        log.warning("deprecated: %s", line)
    return settings


def _renamed(raw: Mapping[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """The config with renamed keys under their new names, and a line for each old one used.
    Both names at once is an error: which one was meant?"""
    data, lines = dict(raw), []
    for old, new in RENAMED.items():
        if old not in data:
            continue
        if new in data:
            raise ConfigError(source, [f"{old}: renamed to `{new}`; give only `{new}`"])
        data[new] = data.pop(old)
        lines.append(f"`{old}` is now `{new}`; the old name will stop working")
    return data, lines


def _moved(settings: GatewaySettings) -> list[str]:
    """A line for each option used where it no longer belongs (it still works there)."""
    return [
        f"`models[{i}].on_demand.max_waiting` is now `models[{i}].queue.max_waiting`; the old "
        "place will stop working"
        for i, model in enumerate(settings.models)
        if model.on_demand is not None and "max_waiting" in model.on_demand.model_fields_set
    ]


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


def _as_mapping(value: Any, plain: str) -> dict[str, Any]:
    """A section given as a mapping, or as a plain string standing for its ``plain`` field."""
    if isinstance(value, str):
        return {plain: value}
    return dict(value) if isinstance(value, Mapping) else {}


def _listed(environ: Mapping[str, str], name: str) -> list[str]:
    """A comma-separated list from the environment, blanks dropped."""
    return [k.strip() for k in environ.get(name, "").split(",") if k.strip()]


def _describe(exc: ValidationError) -> list[str]:
    """One line per problem, each naming its field. Cross-field checks name their own fields."""
    lines = []
    for err in exc.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblems):
            lines += [
                f"{where}.{field}: {message}".lstrip(".") for field, message in cause.problems
            ]
            continue
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown option (check the spelling)"
        if where:
            lines.append(f"{where.lstrip('.')}: {message}")
        else:
            lines += message.split("; ")
    return lines
