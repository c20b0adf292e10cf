"""What backends/ raises on purpose becomes the gateway error a client should see, in one
module; a kind it does not know is not translated (a bug, for the outer boundary)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gateway.errors
from backends.errors import (
    AdapterError,
    BackendError,
    LoadFailed,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    SleepModeError,
    StartFailed,
)
from backends.pool import Replica
from gateway.backend_errors import adapter_failure, backend_errors
from gateway.errors import GatewayError

REPLICA = Replica(url="http://a.test")


def mapped(exc: BackendError) -> GatewayError:
    with pytest.raises(GatewayError) as raised, backend_errors():
        raise exc
    assert raised.value.__cause__ is exc
    return raised.value


@pytest.mark.parametrize("kind", [StartFailed, ShuttingDown])
def test_a_request_that_cannot_be_served_now_is_503_with_its_wait_rounded_up(
    kind: type[StartFailed],
) -> None:
    error = mapped(kind("model m is starting", retry_after=2.2))
    assert (error.status, error.code, error.retry_after) == (503, "model_not_started", 3)
    assert error.message == "model m is starting"


@pytest.mark.parametrize(
    ("kind", "code"), [(QueueFull, "queue_full"), (QueueTimeout, "queue_timeout")]
)
def test_a_model_whose_queue_refuses_a_request_is_429_with_its_wait_rounded_up(
    kind: type[QueueFull], code: str
) -> None:
    error = mapped(kind("model m is overloaded", retry_after=2.2))
    assert (error.status, error.type, error.code, error.retry_after) == (
        429,
        "rate_limit_error",
        code,
        3,
    )


def test_a_wait_below_a_second_is_told_as_one() -> None:
    assert mapped(QueueFull("full", retry_after=0.1)).retry_after == 1


def test_a_model_that_failed_to_load_is_503_with_retry_after() -> None:
    error = mapped(LoadFailed("no server became ready"))
    assert (error.status, error.code) == (503, "model_not_started")
    assert error.retry_after is not None


def test_a_failed_sleep_or_wake_is_502() -> None:
    assert mapped(SleepModeError("still asleep")).code == "bad_gateway"


@pytest.mark.parametrize(
    ("status", "code"), [(404, "adapter_not_found"), (400, None), (500, "bad_gateway")]
)
def test_an_adapter_refusal_passes_on_vllms_4xx_and_else_is_502(
    status: int, code: str | None
) -> None:
    error = mapped(AdapterError(REPLICA, status, "no adapter at /x"))
    assert (error.status, error.code) == ({404: 404, 400: 400}.get(status, 502), code)


def test_adapter_failures_on_several_replicas_name_each() -> None:
    errors = [AdapterError(REPLICA, 404, "nope"), AdapterError(Replica(url="http://b"), 0, "x")]
    error = adapter_failure("loading", "tone", errors, alike=False)
    assert error.code == "bad_gateway" and "http://a.test" in error.message
    assert "http://b" in error.message and "2 replica(s)" in error.message
    assert adapter_failure("loading", "tone", errors[:1], alike=True).code == "adapter_not_found"


def test_a_backend_error_of_a_kind_not_mapped_is_not_translated() -> None:
    class Novel(BackendError):
        pass

    with pytest.raises(Novel), backend_errors():
        raise Novel("a kind added without a mapping")


def test_the_gateways_errors_import_nothing_from_backends() -> None:
    tree = ast.parse(Path(gateway.errors.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "backends"]
