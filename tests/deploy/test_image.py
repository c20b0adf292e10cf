"""The CPU image, built and run for real: from the host, through the container's published
loopback port, the OpenAI SDK reaches the tiny models the gateway inside spawns.

The tests share one container (three vLLM CPU servers take minutes to start) and run in file
order: the last one stops it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import openai
import pytest
import yaml

from backends.process import free_port
from tests.deploy.container import ROOT, STOP_GRACE, Container, build_image, podman
from tests.helpers import wait_until
from tests.servers import alive
from tests.vllm_rig import READY_TIMEOUT

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # three servers in it, after the rig

KEY = "sk-image-test"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # config/cpu-demo.yaml's launcher
MODELS = ("tiny-chat", "tiny-embed", "tiny-rerank")  # the demo's models that start at once
# Each model in turn; the first wait is the rig's bound for a real vLLM start (900 s unless
# VLLM_GATEWAY_TEST_READY_TIMEOUT says otherwise): on two shared cores three vLLM servers in
# one container took over 290 s to start on 2026-12-03 (load/results/image-2026-12-03.md).
RERANK: dict[str, object] = {
    "model": "tiny-rerank",
    "query": "where is the cat",
    "documents": ["the cat", "a dog"],
}
READY_REQUESTS: dict[str, tuple[str, dict[str, object]]] = {
    "tiny-chat": (
        "/v1/chat/completions",
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
    "tiny-embed": ("/v1/embeddings", {"model": "tiny-embed", "input": "hi"}),
    "tiny-rerank": ("/v1/rerank", RERANK),
}


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory, rig_stopped: None) -> Iterator[Container]:
    """The demo config (its models at once, a keys file instead of environment keys)."""
    build_image()
    config = yaml.safe_load((ROOT / "config" / "cpu-demo.yaml").read_text())
    config["models"] = [m for m in config["models"] if m["name"] in MODELS]
    config["keys_file"] = "/etc/vllm-gateway/keys.yaml"
    folder = tmp_path_factory.mktemp("image")
    config_file, keys_file = folder / "config.yaml", folder / "keys.yaml"
    config_file.write_text(yaml.safe_dump(config))
    keys_file.write_text(yaml.safe_dump({"keys": [{"name": "test", "key": KEY}]}))
    for path in (config_file, keys_file):
        path.chmod(0o644)  # readable by the image's user, uid 10001
    box = Container(
        f"vllm-gateway-test-{uuid.uuid4().hex[:8]}", free_port(), config_file, keys_file
    )
    try:
        started = time.monotonic()
        for model in READY_REQUESTS:  # they load side by side: the later waits are short
            wait_for(box, model)
        print(f"\n{box.name}: every model answered {time.monotonic() - started:.0f} s after run")
        yield box
    finally:
        box.remove()


def wait_for(box: Container, model: str) -> None:
    endpoint, body = READY_REQUESTS[model]
    try:
        wait_until(lambda: box.answers(endpoint, body, KEY), READY_TIMEOUT, model, every=1)
    except TimeoutError as late:
        raise AssertionError(f"{late}; the gateway's log:\n{box.logs()[-4000:]}") from None


def client(box: Container, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_sdk_lists_models_chats_streams_embeds_and_reranks_through_the_container(
    container: Container,
) -> None:
    sdk = client(container)
    assert {m.id for m in sdk.models.list()} >= set(MODELS)

    chat = sdk.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert chat.model == "tiny-chat" and chat.usage is not None and chat.usage.completion_tokens > 0

    stream = sdk.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        stream=True,
        temperature=0,
    )
    chunks = list(stream)
    assert len(chunks) > 1 and chunks[-1].choices[-1].finish_reason in ("length", "stop")

    vectors = sdk.embeddings.create(model="tiny-embed", input=["the cat", "a dog"]).data
    assert len(vectors) == 2 and len(vectors[0].embedding) == len(vectors[1].embedding) > 0

    ranked = sdk.post("/rerank", body=RERANK, cast_to=object)
    assert isinstance(ranked, dict)
    assert sorted(r["index"] for r in ranked["results"]) == [0, 1]


def test_a_key_outside_the_mounted_keys_file_gets_401(container: Container) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client(container, "sk-not-in-the-keys-file").models.list()
    assert refused.value.status_code == 401


def test_the_image_health_check_reports_healthy(container: Container) -> None:
    """Podman runs health checks from systemd timers; without systemd (CI's VMs) the check is
    run on demand, and its result is what `podman inspect` shows."""
    podman("healthcheck", "run", container.name)
    state = container.inspect()["State"]
    health = state.get("Health") or state.get("Healthcheck")
    assert health is not None and health["Status"] == "healthy", health


def test_every_process_in_the_container_runs_as_the_non_root_user(container: Container) -> None:
    processes = container.processes()
    assert {p["user"] for p in processes} == {"gateway"}, processes
    servers = [p for p in processes if p["args"].split()[1:3] == ["-m", SERVER_MODULE]]
    assert len(servers) == len(MODELS)
    assert podman("exec", container.name, "id", "-u").strip() == "10001"


def test_the_gateway_logs_to_stdout(container: Container) -> None:
    logs = container.logs()
    assert "Uvicorn running on" in logs or "tiny-chat" in logs, logs[-2000:]


def test_podman_stop_ends_every_process_of_the_container_within_the_grace_period(
    container: Container,
) -> None:
    """Exit code 137 would mean podman's SIGKILL at the end of the grace period; tini passes
    SIGTERM to the gateway, which stops every vLLM server it started and exits by itself."""
    pids = [int(p["hpid"]) for p in container.processes()]
    assert len(pids) >= 1 + 2 * len(MODELS)  # tini, the gateway, a reaper and server per model
    podman("stop", "--time", str(STOP_GRACE), container.name, timeout=STOP_GRACE + 30)
    state = container.inspect()["State"]
    assert state["Status"] == "exited"
    assert state["ExitCode"] in (0, 143), state  # not 137
    assert not [pid for pid in pids if alive(pid)]
