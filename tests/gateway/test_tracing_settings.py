"""`tracing:` in the config, and what it adds to spawned vLLM servers (`tracing.backends`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.supervisor import Supervisor
from gateway import tracing_settings
from gateway.app import create_app
from gateway.commands.cli import main
from gateway.config_file import ConfigError, settings_from_dict
from gateway.relay import Relay
from gateway.specs import backend_specs

CHAT = {"name": "tiny-chat", "url": "http://127.0.0.1:18001"}
SPAWNED = {"name": "spawned", "vllm": {"model": "m", "env": {"OTEL_SERVICE_NAME": "mine"}}}


def settings(**tracing: Any) -> Any:
    return settings_from_dict({"models": [CHAT, SPAWNED], "tracing": tracing}, env={})


def problems(**tracing: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings(**tracing)
    return info.value.problems


def test_tracing_is_absent_unless_configured() -> None:
    assert settings_from_dict({"models": [CHAT]}, env={}).tracing is None


def test_an_http_endpoint_without_a_path_gets_otlps_traces_path() -> None:
    assert settings(otlp_endpoint="http://c:4318").tracing.url == "http://c:4318/v1/traces"
    assert settings(otlp_endpoint="http://c:4318/").tracing.url == "http://c:4318/v1/traces"
    assert settings(otlp_endpoint="http://c/in/x").tracing.url == "http://c/in/x"
    grpc = settings(otlp_endpoint="http://c:4317", protocol="grpc").tracing
    assert grpc.url == "http://c:4317"


def test_bad_tracing_options_are_named_by_their_field() -> None:
    assert problems(otlp_endpoint="c:4318", sample_ratio=2, protocol="zipkin") == [
        "tracing.otlp_endpoint: not an http(s) URL",
        "tracing.protocol: Input should be 'http/protobuf' or 'grpc'",
        "tracing.sample_ratio: Input should be less than or equal to 1",
    ]
    assert problems(endpoint="http://c:4318") == [
        "tracing.otlp_endpoint: Field required",
        "tracing.endpoint: unknown option (check the spelling)",
    ]


def test_grpc_without_its_exporter_installed_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing_settings, "GRPC_EXPORTER", "no_such_package.grpc")
    assert problems(otlp_endpoint="http://c:4317", protocol="grpc") == [
        "tracing.protocol: grpc needs the opentelemetry-exporter-otlp-proto-grpc package (the "
        "cpu and gpu extras have it, or the otlp-grpc extra)"
    ]


def test_collector_headers_never_print() -> None:
    traced = settings(otlp_endpoint="http://c:4318", headers={"authorization": "Bearer s3"})
    assert "s3" not in repr(traced)


def test_backends_true_gives_each_spawned_server_the_endpoint_and_the_rest_by_environment() -> None:
    traced = settings(otlp_endpoint="http://c:4318", backends=True, headers={"x-token": "s3 cr=t"})
    (spec,) = backend_specs(traced)
    command = spec.command(8000)
    assert command[command.index("--otlp-traces-endpoint") + 1] == "http://c:4318/v1/traces"
    assert "s3" not in " ".join(command)  # a secret goes by environment only
    assert spec.env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"  # vLLM's: grpc
    assert spec.env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == "x-token=s3%20cr%3Dt"
    assert spec.env["OTEL_RESOURCE_ATTRIBUTES"] == "vllm_gateway.model=spawned"
    assert spec.env["OTEL_SERVICE_NAME"] == "mine"  # the model's own env wins


def test_plan_shows_the_trace_environment_but_not_the_collectors_headers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracing = {"otlp_endpoint": "http://c:4318", "backends": True, "headers": {"x-t": "s3"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": [SPAWNED], "tracing": tracing}))
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OTEL_EXPORTER_OTLP_TRACES_HEADERS=<secret>" in out and "s3" not in out
    assert "--otlp-traces-endpoint http://c:4318/v1/traces" in out


def test_without_backends_spawned_servers_export_nothing() -> None:
    (spec,) = backend_specs(settings(otlp_endpoint="http://c:4318"))
    assert "--otlp-traces-endpoint" not in spec.command(8000)
    assert "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" not in spec.env


def test_an_untraced_gateway_builds_no_tracer() -> None:
    untraced = settings_from_dict({"models": [CHAT]}, env={})
    app = create_app(untraced, supervisor=Supervisor([]))
    relay = _relay(app)
    assert relay.tracing is None and relay.telemetry.tracing is None


def _relay(app: Any) -> Relay:
    while not isinstance(getattr(app, "relay", None), Relay):
        app = app.app  # through the middleware to the dispatcher
    relay: Relay = app.relay
    return relay
