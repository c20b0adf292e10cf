"""GPU slices that hold: neighbours start in turn, a crash ends the whole tree, and a restart
waits for the old tree's GPU memory. Fake vLLM servers, spawned exactly as real ones are (the
CPU build ignores GPU indices, so the ordering is the supervisor's alone); real vLLM goes through
the same paths in tests/integration/test_spawn.py, and on a GPU in load/gpu_check.sh.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.lifecycle import BackendState
from backends.spec import VllmSpec
from backends.supervisor import Supervisor
from tests.backends.test_supervisor import FAST, until
from tests.servers import FAKE_VLLM, alive, descendants

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

LOAD_SECONDS = 0.5  # each fake server's start-up: long enough to see overlaps


def spec(name: str, gpus: tuple[int, ...], **args: object) -> VllmSpec:
    return VllmSpec(
        name=name,
        model="fake",
        launcher=(sys.executable, FAKE_VLLM),
        gpus=gpus,
        args={"startup-delay": LOAD_SECONDS, **args},
    )


@pytest.fixture
async def layout(tmp_path: Path) -> AsyncIterator[Supervisor]:
    """a and b share GPU 0; c has GPU 1 to itself."""
    sup = Supervisor(
        [spec("a", (0,)), spec("b", (0,)), spec("c", (1,))], log_dir=tmp_path, timings=FAST
    )
    await sup.start()
    yield sup
    await sup.stop()


def ready(sup: Supervisor, *names: str) -> bool:
    return all(sup.backends[n].replica.state is BackendState.READY for n in names)


async def test_models_sharing_a_gpu_start_one_after_another(layout: Supervisor) -> None:
    a, b, c = (layout.backends[n] for n in "abc")
    await until(lambda: b.replica.state is BackendState.WAITING, 5)
    await until(lambda: ready(layout, "a", "b", "c"), 15)
    # b started only once a was ready; c, on its own GPU, started beside a.
    assert a.replica.ready_since is not None
    assert b.process.started_at >= a.replica.ready_since
    assert c.process.started_at < a.replica.ready_since


async def test_restarts_on_a_shared_gpu_take_turns_too(layout: Supervisor) -> None:
    await until(lambda: ready(layout, "a", "b"), 15)
    a, b = layout.backends["a"], layout.backends["b"]
    for backend in (a, b):
        (server,) = descendants(backend.process.pid)
        os.kill(server, signal.SIGKILL)
    await until(lambda: a.replica.restarts == b.replica.restarts == 1, 10)
    await until(lambda: ready(layout, "a", "b"), 15)
    first, second = sorted((a, b), key=lambda backend: backend.process.started_at)
    assert first.replica.ready_since is not None
    assert second.process.started_at >= first.replica.ready_since


async def test_a_killed_helper_and_server_take_the_engine_core_with_them(
    tmp_path: Path,
) -> None:
    """What `pkill -9 -f MODEL` hits: the reaper and the server, not the engine core below
    them, which lives on under init. The gateway ends the rest of the tree by its group."""
    sup = Supervisor([spec("m", (), **{"engine-core": True})], log_dir=tmp_path, timings=FAST)
    await sup.start()
    try:
        backend = sup.backends["m"]
        await until(lambda: ready(sup, "m"), 10)
        reaper = backend.process.pid
        assert reaper is not None
        tree = backend.process.tree()
        below = descendants(reaper)
        (engine_core,) = [p for p in below if b"sleep" in Path(f"/proc/{p}/cmdline").read_bytes()]
        (server,) = below - {engine_core}
        assert set(tree) == {reaper, server, engine_core}
        os.kill(reaper, signal.SIGKILL)
        os.kill(server, signal.SIGKILL)
        await until(lambda: not alive(engine_core), 10)
        await until(lambda: ready(sup, "m") and backend.process.pid != reaper, 15)
        assert backend.replica.restarts == 1
    finally:
        await sup.stop()
    assert not any(alive(pid) for pid in tree)


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `nvidia-smi` on PATH that lists, as GPU memory holders, the pids in a file."""
    holders = tmp_path / "holders"
    holders.write_text("")
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\nsed "s/$/, 1024/" "{holders}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return holders


async def test_a_restart_waits_until_the_old_tree_frees_its_gpu_memory(
    tmp_path: Path, fake_nvidia_smi: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor([spec("m", (0,))], log_dir=tmp_path, timings=FAST)
    await sup.start()
    try:
        backend = sup.backends["m"]
        await until(lambda: ready(sup, "m"), 10)
        (server,) = descendants(backend.process.pid)
        fake_nvidia_smi.write_text(f"{server}\n")  # the driver has not let go of it yet
        with caplog.at_level(logging.WARNING, "vllm_gateway.supervisor"):
            os.kill(server, signal.SIGKILL)
            await until(lambda: "to free their GPU memory" in caplog.text, 10)
        held_since = time.monotonic()
        life = sup.life("m")
        moved = await life.until(lambda: backend.replica.state is not BackendState.RESTARTING, 0.5)
        assert not moved  # no new server while the old tree holds the GPU
        fake_nvidia_smi.write_text("")
        await until(lambda: ready(sup, "m"), 15)
        assert backend.process.started_at > held_since
    finally:
        await sup.stop()


def model_dir(tmp_path: Path) -> Path:
    """A config.json whose KV cache costs 2 x 2 layers x 1 head x 64 x 4 bytes = 1 KiB a token."""
    path = tmp_path / "model"
    path.mkdir()
    path.joinpath("config.json").write_text(
        '{"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,'
        ' "hidden_size": 128, "torch_dtype": "float32"}'
    )
    return path


@pytest.mark.parametrize(("blocks", "short"), [(65536, False), (16384, True)])
async def test_the_kv_cache_a_server_got_is_checked_against_its_slice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, blocks: int, short: bool
) -> None:
    """1 GiB of CPU KV cache at 1 KiB a token is 1,048,576 tokens: 65,536 blocks of 16. A
    server that got a quarter of that is named in a warning with both numbers."""
    server = VllmSpec(
        name="m",
        model=str(model_dir(tmp_path)),
        launcher=(sys.executable, FAKE_VLLM),
        args={"num-gpu-blocks": blocks},
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    sup = Supervisor([server], log_dir=tmp_path, timings=FAST)
    with caplog.at_level(logging.INFO, "vllm_gateway.supervisor"):
        await sup.start()
        try:
            replica = sup.backends["m"].replica
            await until(lambda: replica.kv_cache is not None, 10)
        finally:
            await sup.stop()
    assert replica.kv_cache is not None
    assert replica.kv_cache.expected_tokens == 1_048_576
    assert replica.kv_cache.actual_tokens == blocks * 16
    assert replica.kv_cache.short is short
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "KV cache" in r.msg]
    assert bool(warned) is short
    if short:
        assert "expected 1.00 GiB (1,048,576 tokens), got 0.25 GiB" in warned[0].getMessage()
