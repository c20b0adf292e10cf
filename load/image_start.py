"""How long the CPU image takes from `podman run` to its first answers, and `podman stop` to
gone: the numbers in load/results/image-<date>.md.

    .venv/bin/python load/image_start.py [--image vllm-gateway:cpu] [--port 8011]

Runs the demo config's always-on models (tiny-chat, tiny-embed, tiny-rerank) with a key from
the environment; polls on loopback with a deadline; removes the container at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
KEY = "sk-image-bench"
MODELS = ("tiny-chat", "tiny-embed", "tiny-rerank")
DEADLINE = 600.0


def answered(url: str, path: str, body: dict[str, object] | None) -> bool:
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        if body is None:
            return httpx.get(url + path, headers=headers, timeout=5).status_code == 200
        return httpx.post(url + path, json=body, headers=headers, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="vllm-gateway:cpu")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    config = yaml.safe_load((ROOT / "config" / "cpu-demo.yaml").read_text())
    config["models"] = [m for m in config["models"] if m["name"] in MODELS]
    config_file = Path(f"/tmp/image-bench-{os.getpid()}.yaml")
    config_file.write_text(yaml.safe_dump(config))
    config_file.chmod(0o644)
    name = f"vllm-gateway-bench-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{args.port}"
    checks: dict[str, tuple[str, dict[str, object] | None]] = {
        "health": ("/health", None),
        "tiny-chat": (
            "/v1/chat/completions",
            {
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
        ),
        "tiny-embed": ("/v1/embeddings", {"model": "tiny-embed", "input": "hi"}),
        "tiny-rerank": (
            "/v1/rerank",
            {"model": "tiny-rerank", "query": "cat", "documents": ["the cat", "a dog"]},
        ),
    }
    env = dict(os.environ, VLLM_GATEWAY_API_KEYS=KEY)
    started = time.monotonic()
    subprocess.run(
        [*PODMAN, "run", "-d", "--name", name, "-p", f"127.0.0.1:{args.port}:8000",
         "--stop-timeout", "60", "--shm-size", "1g", "--env", "VLLM_GATEWAY_API_KEYS",
         "-v", f"{config_file}:/etc/vllm-gateway/config.yaml:ro", args.image],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    first: dict[str, float] = {}
    try:
        while len(first) < len(checks) and time.monotonic() - started < DEADLINE:
            for what, (path, body) in checks.items():
                if what not in first and answered(url, path, body):
                    first[what] = round(time.monotonic() - started, 1)
            time.sleep(0.5)
        stop_started = time.monotonic()
        subprocess.run([*PODMAN, "stop", "--time", "60", name], check=True, capture_output=True)
        stopped = round(time.monotonic() - stop_started, 1)
        state = json.loads(
            subprocess.run(
                [*PODMAN, "inspect", name], check=True, capture_output=True, text=True
            ).stdout
        )[0]["State"]
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True, check=False)
        config_file.unlink(missing_ok=True)
    print(json.dumps({"first_answer_s": first, "stop_s": stopped, "exit_code": state["ExitCode"]}))
    return 0 if len(first) == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
