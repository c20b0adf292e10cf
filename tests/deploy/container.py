"""The CPU image as a test runs it: built by scripts/image.sh, started with podman on loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "vllm-gateway:cpu"  # scripts/image.sh's default tag
# runc with cgroupfs: crun refuses the hybrid cgroups of the VMs CI runs on (docs/deploy.md).
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
BUILD_TIMEOUT = 290  # a warm build; scripts/test.sh makes the cold one before pytest
# vLLM's engine takes 160 MiB of /dev/shm per server; podman's default is 64 MiB.
SHM_SIZE = "1g"
STOP_GRACE = 60  # seconds podman waits after SIGTERM before SIGKILL, as in deploy/compose.yaml


def podman(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done.stdout


def build_image() -> None:
    """Reuses every cached layer: seconds when the tree has not changed since the last build."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "image.sh"), "build"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"scripts/image.sh build failed:\n{done.stdout[-4000:]}{done.stderr}")


class Container:
    """One container of the image, its config and keys file mounted read-only."""

    def __init__(self, name: str, port: int, config: Path, keys: Path) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        podman(
            "run",
            "--detach",
            "--name",
            name,
            "--publish",
            f"127.0.0.1:{port}:8000",
            "--stop-timeout",
            str(STOP_GRACE),
            "--shm-size",
            SHM_SIZE,
            "--volume",
            f"{config}:/etc/vllm-gateway/config.yaml:ro",
            "--volume",
            f"{keys}:/etc/vllm-gateway/keys.yaml:ro",
            IMAGE,
        )

    def inspect(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(podman("inspect", self.name))[0]
        return state

    def processes(self) -> list[dict[str, str]]:
        """Every process of the container: its user inside, host pid and command line."""
        lines = podman("top", self.name, "user", "hpid", "args").splitlines()[1:]
        rows = []
        for line in lines:
            user, hpid, args = line.split(maxsplit=2)
            rows.append({"user": user, "hpid": hpid, "args": args})
        return rows

    def logs(self) -> str:
        done = subprocess.run(
            [*PODMAN, "logs", self.name], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout + done.stderr

    def answers(self, path: str, body: dict[str, Any], key: str) -> bool:
        try:
            response = httpx.post(
                f"{self.url}{path}",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def remove(self) -> None:
        subprocess.run(
            [*PODMAN, "rm", "--force", "--time", "0", self.name],
            capture_output=True,
            timeout=120,
            check=False,
        )
