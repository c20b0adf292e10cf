"""`tracing:` in the config: where the gateway's OpenTelemetry spans go (docs/tracing.md).

Its own module so that reading a config never imports the OpenTelemetry SDK; only a gateway
whose config has `tracing` builds a tracer (``gateway.tracing``).
"""

from __future__ import annotations

import importlib.util
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from gateway.strict import Strict

OTLP_HTTP_PATH = "/v1/traces"  # where an OTLP/HTTP collector takes traces (the spec's default)
GRPC_EXPORTER = "opentelemetry.exporter.otlp.proto.grpc"


class TracingSettings(Strict):
    """OpenTelemetry traces: one per relayed request, admin action and swap."""

    otlp_endpoint: str = Field(
        description="the collector's OTLP URL: http://host:4318/v1/traces for http/protobuf "
        "(a URL without a path gets /v1/traces), http://host:4317 for grpc"
    )
    protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf", description="OTLP's transport; grpc needs opentelemetry-exporter-otlp"
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of new traces recorded; a request whose client sent a traceparent "
        "follows that trace's sampled flag",
    )
    service_name: str = Field(
        "vllm-gateway", min_length=1, description="service.name of the gateway's spans"
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="sent with every export (a collector's token); spawned servers get them "
        "by environment, never on a command line",
    )
    backends: bool = Field(
        False,
        description="spawn mode: every spawned vLLM server exports its own spans to the same "
        "endpoint (vLLM's --otlp-traces-endpoint), nested under the gateway's",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        return url

    @field_validator("protocol")
    @classmethod
    def _grpc_installed(cls, protocol: str) -> str:
        if protocol == "grpc" and not _installed(GRPC_EXPORTER):
            raise ValueError(
                "grpc needs the opentelemetry-exporter-otlp-proto-grpc package (the cpu and "
                "gpu extras have it, or the otlp-grpc extra)"
            )
        return protocol

    @property
    def url(self) -> str:
        """The endpoint as exporters take it: OTLP/HTTP's needs its path, gRPC's none."""
        if self.protocol == "http/protobuf" and urlsplit(self.otlp_endpoint).path in ("", "/"):
            return self.otlp_endpoint.rstrip("/") + OTLP_HTTP_PATH
        return self.otlp_endpoint

    def header_values(self) -> dict[str, str]:
        return {name: value.get_secret_value() for name, value in self.headers.items()}


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
