"""Only the `model` is read from a request, and bad bodies get a precise 4xx."""

import pytest

from gateway.errors import InvalidJSON, InvalidModel, InvalidRequest, UnsupportedMediaType
from gateway.peek import model_from_json, model_from_multipart

JSON = "application/json"


def test_model_is_read_from_a_json_object() -> None:
    model, doc = model_from_json(b'{"model": "tiny-chat", "messages": []}', JSON)
    assert model == "tiny-chat"
    assert doc["messages"] == []


def test_json_content_type_variants_are_accepted() -> None:
    for content_type in ("", "application/json; charset=utf-8", "application/vnd.api+json"):
        assert model_from_json(b'{"model": "m"}', content_type)[0] == "m"


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"", InvalidJSON, "empty"),
        (b"{bad", InvalidJSON, "not valid JSON"),
        (b"\xff\xfe{}", InvalidJSON, "not valid JSON"),
        (b"[1, 2]", InvalidRequest, "must be a JSON object"),
        (b'"text"', InvalidRequest, "must be a JSON object"),
        (b"{}", InvalidModel, "provide a `model`"),
        (b'{"model": null}', InvalidModel, "provide a `model`"),
        (b'{"model": 3}', InvalidModel, "must be a string, not int"),
        (b'{"model": ["a"]}', InvalidModel, "must be a string, not list"),
        (b'{"model": ""}', InvalidModel, "must not be empty"),
        (b'{"model": "a\\u0000b"}', InvalidModel, "at most 256"),
        (b'{"model": "' + b"x" * 10_000 + b'"}', InvalidModel, "at most 256"),
    ],
)
def test_bad_bodies(body: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        model_from_json(body, JSON)
    assert info.value.status == 400


def test_wrong_content_type_is_415() -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        model_from_json(b'{"model": "m"}', "text/plain")
    assert info.value.status == 415


def multipart(fields: dict[str, bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    parts = []
    for name, value in fields.items():
        filename = '; filename="a.wav"' if name == "file" else ""
        parts.append(
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_model_is_read_from_a_multipart_form_after_the_file() -> None:
    body, content_type = multipart({"file": b"RIFF\r\n\r\n--not-a-boundary", "model": b"whisper"})
    model, value = model_from_multipart(body, content_type)
    assert model == "whisper" and body[value] == b"whisper"


def test_the_model_field_can_be_renamed_in_place_for_an_alias() -> None:
    body, content_type = multipart({"model": b"whisper-1", "file": b"RIFF", "language": b"en"})
    _, value = model_from_multipart(body, content_type)
    renamed = body[: value.start] + b"tiny-whisper" + body[value.stop :]
    assert renamed == multipart({"model": b"tiny-whisper", "file": b"RIFF", "language": b"en"})[0]


def test_multipart_without_model_is_400() -> None:
    body, content_type = multipart({"file": b"RIFF"})
    with pytest.raises(InvalidModel, match="provide a `model`"):
        model_from_multipart(body, content_type)


def test_multipart_path_needs_a_multipart_body() -> None:
    with pytest.raises(UnsupportedMediaType):
        model_from_multipart(b'{"model": "m"}', JSON)
