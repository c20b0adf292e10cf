"""A backend spec becomes exactly the `vllm serve` command and environment it describes."""

from backends.spec import VllmSpec, render_flag

# The CPU build of vLLM has no working `vllm` console script; this module path works on both.
PYTHON_LAUNCHER = ("python", "-m", "vllm.entrypoints.openai.api_server")


def test_vllm_serve_takes_the_model_positionally() -> None:
    spec = VllmSpec(
        name="chat",
        model="Qwen/Qwen2.5-72B-Instruct",
        gpus=(0, 1, 2, 3),
        args={"max-model-len": 32768, "gpu-memory-utilization": 0.9},
    )
    assert spec.command(8001) == [
        "vllm",
        "serve",
        "Qwen/Qwen2.5-72B-Instruct",
        "--served-model-name",
        "chat",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--max-model-len",
        "32768",
        "--gpu-memory-utilization",
        "0.9",
        "--tensor-parallel-size",
        "4",
    ]


def test_module_launcher_takes_model_as_a_flag() -> None:
    spec = VllmSpec(name="m", model="/models/tiny", launcher=PYTHON_LAUNCHER)
    cmd = spec.command(9000)
    assert cmd[:5] == [
        "python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/tiny",
    ]
    assert "--api-key" not in cmd


def test_flag_values() -> None:
    assert render_flag("enforce-eager", True) == ["--enforce-eager"]
    assert render_flag("enforce-eager", False) == []
    assert render_flag("limit-mm-per-prompt", {"image": 4, "video": 1}) == [
        "--limit-mm-per-prompt",
        '{"image":4,"video":1}',
    ]
    assert render_flag("middleware", ["a", "b"]) == ["--middleware", "a", "b"]


def test_gpus_become_cuda_visible_devices() -> None:
    spec = VllmSpec(name="m", model="x", gpus=(4, 5), env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    env = spec.environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,5", "VLLM_LOGGING_LEVEL": "DEBUG"}
    assert spec.tensor_parallel_size == 2


def test_the_backend_key_goes_by_the_environment_never_on_the_command_line() -> None:
    spec = VllmSpec(name="m", model="x", env={"VLLM_API_KEY": "from-the-config"})
    assert spec.environment({"PATH": "/bin"}, api_key="sk-k")["VLLM_API_KEY"] == "sk-k"
    assert "sk-k" not in spec.command(9000)


def test_a_key_inherited_from_the_gateway_does_not_reach_a_server_started_without_one() -> None:
    spec = VllmSpec(name="m", model="x")
    assert "VLLM_API_KEY" not in spec.environment({"VLLM_API_KEY": "sk-stray"})


def test_a_spawned_server_gets_none_of_the_gateways_own_settings() -> None:
    """Its client keys (`VLLM_GATEWAY_API_KEYS`) above all: a server has no use for them."""
    base = {"VLLM_GATEWAY_API_KEYS": "sk-client", "PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env = VllmSpec(name="m", model="m").environment(base)
    assert env == {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1"}
