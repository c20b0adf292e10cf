"""`vllm-gateway config-reference`: docs/configuration.md, written from the settings themselves.

Every option's type, default and description come from its pydantic field, so the reference
cannot drift from what the gateway accepts; a test fails when the committed file is stale.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.access_settings import KeysFile
from gateway.settings import API_KEYS_ENV, MONITOR_KEYS_ENV, RENAMED, GatewaySettings

COMMAND = ".venv/bin/python -m gateway config-reference -o docs/configuration.md"

_HEAD = f"""# Configuration reference

<!-- Generated from the settings' own field descriptions (gateway/*settings*.py) by
`{COMMAND}`. Do not edit by hand: change a field's `description=` and run that command. -->

One YAML file, validated at start-up: every problem is reported at once, one line per field
(`models[2].url: not an http(s) URL`), and unknown keys are errors, as are options that another
setting would leave without effect (an `affinity_header` without `balance: affinity`, say).
`vllm-gateway check --config FILE` validates a file without starting anything;
[config/example.yaml](../config/example.yaml) shows every section, annotated.

Keys also come from the environment: `{API_KEYS_ENV}` (comma-separated, named env-1, env-2, ...)
and `{MONITOR_KEYS_ENV}` (monitor keys, named monitor-1, ...). The command line's `--host`,
`--port`, `--log-level` and `--log-format` (or `VLLM_GATEWAY_HOST`, ...) win over the file.
"""


def render() -> str:
    """The whole reference, as Markdown."""
    parts = [_HEAD]
    parts += _sections(GatewaySettings, "")
    parts.append(
        "## The keys file (`keys_file`)\n\n"
        "Re-read when it changes (a change applies once two looks a second apart agree) and on "
        "SIGHUP; a file that does not validate is logged and the keys in force stay.\n"
    )
    parts.append(_table(KeysFile, nested="same fields as `api_keys[]`"))
    if RENAMED:
        rows = "\n".join(f"| `{old}` | `{new}` |" for old, new in RENAMED.items())
        parts.append(
            "## Renamed options\n\nThe old name still works and logs a deprecation warning at "
            "start-up; giving both is an error.\n\n| old name | new name |\n|---|---|\n"
            + rows
            + "\n"
        )
    return "\n".join(parts)


def _sections(model: type[BaseModel], path: str) -> Iterator[str]:
    """A heading and table for ``model``, then one for each settings object inside it."""
    title = f"`{path.removesuffix('.')}`" if path else "Top level"
    doc = (model.__doc__ or "").strip()
    yield f"## {title}\n\n" + (f"{_one_paragraph(doc)}\n\n" if doc else "") + _table(model)
    for name, field in model.model_fields.items():
        inner, many = _settings_inside(field.annotation)
        if inner is not None:
            yield from _sections(inner, f"{path}{name}{'[]' if many else ''}.")


def _table(model: type[BaseModel], nested: str = "below") -> str:
    rows = ["| option | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        inner, _ = _settings_inside(field.annotation)
        described = (field.description or "").replace("|", "\\|")
        if inner is not None:
            described += f" ({nested})"
        rows.append(
            f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {described} |"
        )
    return "\n".join(rows) + "\n"


def _one_paragraph(doc: str) -> str:
    text = " ".join(line.strip() for line in doc.splitlines() if line.strip())
    return text.replace("``", "`")


def _settings_inside(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The settings class an option holds (directly, optionally or as a list), and whether a
    list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    args = get_args(annotation)
    if get_origin(annotation) is list and args:
        inner, _ = _settings_inside(args[0])
        return inner, inner is not None
    if _is_union(annotation):
        for arg in args:
            inner, many = _settings_inside(arg)
            if inner is not None:
                return inner, many
    return None, False


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if annotation is SecretStr:
        return "string (secret)"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}
    if annotation in simple:
        return simple[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # a type with a validator: the type
        return _type_name(args[0])
    if origin is tuple and len(set(args)) == 1:
        return f"list of {len(args)} {_type_name(args[0])}"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if _is_union(annotation):
        named = [_type_name(a) for a in args if a is not type(None)]
        if len(named) > 3:  # a `vllm serve` flag's value
            return "scalar, list or mapping"
        return " or ".join(named) + (" (optional)" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(below)"
    if value is None:
        return "unset"
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def undescribed() -> list[str]:
    """Options without a description (the test names each), over the whole settings tree."""
    missing: list[str] = []

    def walk(model: type[BaseModel], path: str) -> None:
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{path}{name}")
            inner, many = _settings_inside(field.annotation)
            if inner is not None:
                walk(inner, f"{path}{name}{'[]' if many else ''}.")

    walk(GatewaySettings, "")
    walk(KeysFile, "keys file: ")
    return missing
