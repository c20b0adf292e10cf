"""Reading just enough of a request to route it: the `model` it names.

The body is forwarded as it came; the relay re-encodes it only where it must change.
"""

from __future__ import annotations

from typing import Any, NoReturn

import orjson

from gateway.errors import InvalidBody, InvalidJSON, InvalidModel, UnsupportedMediaType

MAX_MODEL_NAME = 256


def model_from_json(body: bytes, content_type: str) -> tuple[str, dict[str, Any]]:
    """The `model` of a JSON body, and the parsed body (for an alias rewrite)."""
    if content_type and not _is_json(content_type):
        raise UnsupportedMediaType(
            f"Content-Type {content_type[:80]!r} is not supported here; "
            "send the request body as JSON with Content-Type: application/json."
        )
    if not body:
        raise InvalidJSON("The request body is empty; send a JSON object with a `model` field.")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(doc, dict):
        raise InvalidBody("The request body must be a JSON object.")
    return check_model(doc.get("model", _MISSING)), doc


def model_from_multipart(body: bytes, content_type: str) -> tuple[str, slice]:
    """The `model` form field of a multipart/form-data body, found without copying the file,
    and where its value lies in the body (for an alias rewrite)."""
    boundary = _boundary(content_type)
    if boundary is None:
        raise UnsupportedMediaType(
            "This endpoint takes multipart/form-data (a file upload) with a `model` field."
        )
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    while start != -1:
        head_start = start + len(delimiter)
        if body[head_start : head_start + 2] == b"--":
            break  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end == -1:
            break
        next_part = body.find(b"\r\n" + delimiter, head_end)
        if _is_field(body[head_start:head_end], b"model"):
            value_end = next_part if next_part != -1 else len(body)
            raw = body[head_end + 4 : value_end]
            try:
                return check_model(raw.decode("utf-8")), slice(head_end + 4, value_end)
            except UnicodeDecodeError:
                raise InvalidModel("`model` is not valid UTF-8.", param="model") from None
        start = -1 if next_part == -1 else next_part + 2
    _no_model()


_MISSING: Any = object()


def _no_model() -> NoReturn:
    raise InvalidModel("You must provide a `model` parameter.", param="model")


def check_model(model: Any) -> str:
    if model is _MISSING or model is None:
        _no_model()
    if not isinstance(model, str):
        raise InvalidModel(f"`model` must be a string, not {type(model).__name__}.", param="model")
    if not model:
        raise InvalidModel("`model` must not be empty.", param="model")
    if len(model) > MAX_MODEL_NAME or "\x00" in model:
        raise InvalidModel(
            f"`model` must be a model name of at most {MAX_MODEL_NAME} characters.", param="model"
        )
    return model


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


def _boundary(content_type: str) -> bytes | None:
    mime, _, params = content_type.partition(";")
    if mime.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


def _is_field(head: bytes, name: bytes) -> bool:
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            params = [p.strip() for p in value.split(b";")]
            return b'name="' + name + b'"' in params or b"name=" + name in params
    return False
