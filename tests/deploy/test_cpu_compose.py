"""deploy/compose.cpu.yaml and the Debian-built Prometheus image, checked offline (the image they
run is built and run for real in test_image.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.servers import ROOT

pytestmark = pytest.mark.servers  # runs hadolint

DEPLOY = ROOT / "deploy"


def test_the_cpu_compose_runs_the_demo_config_read_only_on_loopback() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.cpu.yaml").read_text())
    gateway = compose["services"]["gateway"]
    source, target, mode = gateway["volumes"][0].split(":")
    assert (DEPLOY / source).resolve() == (ROOT / "config" / "cpu-demo.yaml").resolve()
    assert (target, mode) == ("/etc/vllm-gateway/config.yaml", "ro")
    assert all(port.startswith("127.0.0.1:") for port in gateway["ports"])
    assert gateway["image"] == "localhost/vllm-gateway:cpu"  # scripts/image.sh's tag


def test_only_images_that_can_be_built_here_are_in_the_observability_profile() -> None:
    services = yaml.safe_load((DEPLOY / "compose.cpu.yaml").read_text())["services"]
    observability = [s for s in services.values() if "observability" in s.get("profiles", [])]
    assert observability and all("build" in s for s in observability)
    assert services["grafana"]["profiles"] == ["grafana"]  # a pulled image: its own profile


def test_the_prometheus_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    dockerfile = DEPLOY / "observability" / "prometheus.Dockerfile"
    result = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
