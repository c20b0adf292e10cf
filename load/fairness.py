"""Fair queues under a flood (issue 31): does a key that floods a model starve one that does not?

    .venv/bin/python load/fairness.py [--vllm] [--flood 200] [--pair 2] [--cap 8]
        [--service-ms 200] [--max-tokens 16] [--seconds 20] [--rounds 1] [--phases a,b]
        [--start spread|random|lockstep] [--queue-only [--jitter-ms J]] [--out FILE]

One gateway (`python -m gateway serve`, this checkout) spawns one model: the fake vLLM
(tests/fake_vllm.py) running `--max-num-seqs CAP` generations at once, each `--service-ms`
long, the rest waiting first come, first served as vLLM's own queue does; or, with ``--vllm``,
the tiny chat model on vLLM's CPU build with the same `--max-num-seqs CAP` and
`--scheduling-policy priority` (so the gateway also tells vLLM each request's priority).
Key A keeps ``--flood`` requests in flight; key B sends ``--pair`` at a time. Phases, each
``--seconds`` long, the config switched between them by a reload (the queue changes in
place):

    alone          B alone, the model's queue capped at ``--cap`` in flight
    no queue       A floods, no `max_in_flight`: every request goes to the backend at once
    fair           A floods, `queue.max_in_flight: CAP`, both at priority default
    priority       the same, A at `batch`, B at `interactive` (the priority header)
    reserved       the same, with `queue.reserved: {interactive: PAIR}`: PAIR of the CAP
                   slots kept for interactive requests

With ``--rounds N`` the phases take turns N times (on a shared machine its noise then falls
on each alike); each phase's numbers are those of all its rounds, and each round's ratio to
the alone phase of the same round is listed with their median. Measured: B's latency (p50,
p99; its first second in each phase left out) and A's throughput. The issue's bars: with A
flooding and the queue on, B's p50 within 2x of alone (fair), and B's p99 within 1.5x of alone
(priority). Each B request carries its own request id, and the gateway's access log (JSON)
says how long it waited in the queue and how long the gateway held it, so the report also
says where B's time went at its p99 (``fairness_report.breakdown``), and how much CPU the
gateway, the backend and this load generator used.

``--queue-only`` runs the same phases against the queue alone, in this process, with a
backend of CAP turns of the service time (``queue_only``): the queue's own order, without the
noise of three processes on a shared machine.

When A's first CAP requests start (``--start``) decides when the requests in flight end,
and so how long an interactive request waits for the next end: ``spread`` (the default) one
service time / CAP apart, the best case; ``random`` at random within one service time, as
the ends of a flood that has gone on for a while lie (each request's small delays move its
successors' ends, and over time they drift apart at random); ``lockstep`` all at once, the
worst case (the fake's fixed-time requests then end together for good).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "load"), str(ROOT)]
from fairness_report import Phase, breakdown, by_round, pct, summary, verdicts  # noqa: E402
from loadgen import Result, build_request, read_response  # noqa: E402

from backends.queues import ModelQueue, QueueLimits  # noqa: E402
from gateway.traffic.priorities import parse  # noqa: E402

FAKE = ROOT / "tests" / "fake_vllm.py"
MODEL = "m"
ADMIN, KEY_A, KEY_B = "sk-admin", "sk-flood", "sk-pair"
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
CPU_ARGS = {"dtype": "float32", "enforce-eager": True, "distributed-executor-backend": "uni"}


PHASES = [
    Phase("alone", flood=False, capped=True),
    Phase("no queue", flood=True, capped=False),
    Phase("fair", flood=True, capped=True),
    Phase("priority", flood=True, capped=True, priority_a="batch", priority_b="interactive"),
    Phase(
        "reserved",
        flood=True,
        capped=True,
        priority_a="batch",
        priority_b="interactive",
        reserved=True,
    ),
]


def model(args: argparse.Namespace, phase: Phase) -> dict[str, Any]:
    if args.vllm:
        vllm = {
            "model": str(ROOT / ".cache" / "tiny-models" / "chat"),
            "args": {
                **CPU_ARGS,
                "max-model-len": 512,
                "scheduling-policy": "priority",
                "max-num-seqs": args.cap,  # as the fake: beyond the cap, vLLM's own queue
            },
            "env": CPU_ENV,
        }
    else:
        vllm = {
            "model": "fake",
            "args": {"max-num-seqs": args.cap, "service-ms": args.service_ms},
        }
    entry: dict[str, Any] = {"name": MODEL, "vllm": vllm}
    if phase.capped:
        entry["queue"] = {"max_in_flight": args.cap, "max_waiting": args.flood + 64}
    if phase.reserved:
        entry["queue"]["reserved"] = {phase.priority_b: args.pair}
    return entry


def config(args: argparse.Namespace, phase: Phase, workdir: Path) -> dict[str, Any]:
    launcher = (
        ["python", "-m", "vllm.entrypoints.openai.api_server"]
        if args.vllm
        else [sys.executable, str(FAKE)]
    )
    span = ["interactive", "batch"]
    return {
        "launcher": launcher,
        "log_dir": str(workdir / "logs"),
        "log_level": "warning",
        "access_log": True,  # B's lines say where its time went (fairness_report.breakdown)
        "log_format": "json",
        "keep_backends": 0,
        "timeouts": {"first_byte": 900, "idle": 900},
        "api_keys": [
            {"name": "admin", "key": ADMIN, "admin": True},
            {"name": "a", "key": KEY_A, "priority_range": span},
            {"name": "b", "key": KEY_B, "priority_range": span},
        ],
        "models": [model(args, phase)],
    }


class Gateway:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="fairness-"))
        self.path = self.workdir / "gateway.yaml"
        self.path.write_text(yaml.safe_dump(config(args, PHASES[0], self.workdir)))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(self.path)]
        self.log = self.workdir / "gateway.log"
        log = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        print(f"gateway on {self.port}, files in {self.workdir}", flush=True)

    def ready(self, wait: float) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                answer = httpx.post(
                    f"{self.url}/v1/chat/completions", json=body, headers=auth(KEY_B), timeout=60
                )
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"the model did not serve within {wait:g}s (see {self.workdir})")

    def use(self, phase: Phase) -> None:
        """Rewrite the config and reload it: the queue changes in place."""
        self.path.write_text(yaml.safe_dump(config(self.args, phase, self.workdir)))
        answer = httpx.post(f"{self.url}/admin/reload", headers=auth(ADMIN), timeout=120)
        actions = {m["name"]: m["action"] for m in answer.json().get("models", [])}
        assert answer.status_code == 200 and actions[MODEL] in ("update", "unchanged"), answer.text

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def request(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count slowly from one."}],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
    }


async def client(
    url: str,
    args: argparse.Namespace,
    key: str,
    priority: str,
    stop: asyncio.Event,
    done: dict[str, float] | None,
    counts: dict[str, int],
    delay: float = 0.0,
    record_after: float = 0.0,
    tag: str = "",
) -> None:
    """One client on its own keep-alive connection, raw asyncio (``load/loadgen.py``): a
    client library costs more CPU per request than the gateway, and a pool shared by hundreds
    of waiting requests makes the others wait for a connection, not for the gateway. A
    request, then the next as soon as it is answered, until ``stop``; ``done`` gets the
    latency of each one after ``record_after``, by its request id (``tag`` and a number)."""
    await asyncio.sleep(delay)
    headers = {**auth(key), "x-vllm-gateway-priority": priority}
    body = json.dumps(request(args)).encode()
    host, port, raw = build_request(f"{url}/v1/chat/completions", body, headers)
    reader = writer = None
    unused = Result()
    sent = 0
    while not stop.is_set():
        rid = f"{tag}-{sent}"
        if tag:
            sent += 1
            with_id = {**headers, "x-request-id": rid}
            raw = build_request(f"{url}/v1/chat/completions", body, with_id)[2]
        began = time.monotonic()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            assert reader is not None
            ok = await read_response(reader, time.perf_counter(), unused)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            ok = False
            if writer is not None:
                writer.close()
            reader = writer = None
        ended = time.monotonic()
        if not ok:
            counts["failed"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["done"] += 1
        if done is not None and began >= record_after:
            done[rid] = ended - began
    if writer is not None:
        writer.close()


async def run_phase(
    gw: Gateway, args: argparse.Namespace, phase: Phase, service: float, tag: str
) -> None:
    gw.use(phase)
    stop = asyncio.Event()
    a_counts = {"done": 0, "failed": 0}
    b_counts = {"done": 0, "failed": 0}
    tasks = []
    if phase.flood:
        tasks += [
            asyncio.create_task(
                client(
                    gw.url,
                    args,
                    KEY_A,
                    phase.priority_a,
                    stop,
                    None,
                    a_counts,
                    delay=start_delay(args, i, service),
                )
            )
            for i in range(args.flood)
        ]
        await asyncio.sleep(service * 2 + 1.0)  # the flood fills the queue first
    record_after = time.monotonic() + 1.0
    latencies: dict[str, float] = {}
    tasks += [
        asyncio.create_task(
            client(
                gw.url,
                args,
                KEY_B,
                phase.priority_b,
                stop,
                latencies,
                b_counts,
                record_after=record_after,
                tag=f"b{tag}c{i}",
            )
        )
        for i in range(args.pair)
    ]
    await asyncio.sleep(record_after - time.monotonic())
    a_before = a_counts["done"]
    cpu_before = cpu_seconds(gw.proc.pid)
    watch = asyncio.create_task(backend_queue(gw, phase))
    await asyncio.sleep(args.seconds)
    watch.cancel()
    for name, seconds in cpu_seconds(gw.proc.pid).items():
        phase.cpu[name] = phase.cpu.get(name, 0.0) + seconds - cpu_before[name]
    phase.a_done += a_counts["done"] - a_before
    phase.seconds += time.monotonic() - record_after
    stop.set()
    await asyncio.wait(tasks, timeout=max(60.0, service * args.flood))
    for task in tasks:
        task.cancel()
    phase.a_failed += a_counts["failed"]
    phase.b_failed += b_counts["failed"]
    phase.b_ids.update(latencies)
    phase.b += latencies.values()
    phase.rounds.append(list(latencies.values()))


async def backend_queue(gw: Gateway, phase: Phase) -> None:
    """The most requests the backend's own queue held (its `vllm:num_requests_waiting`,
    relayed by the gateway), sampled 4 times a second: with the gateway's cap at the
    backend's `max-num-seqs` it should hold none."""
    url, name = f"{gw.url}/backends/{MODEL}/metrics", b"vllm:num_requests_waiting{"
    async with httpx.AsyncClient(headers=auth(ADMIN), timeout=10) as http:
        while True:
            text = (await http.get(url)).content
            for line in text.splitlines():
                if line.startswith(name):
                    phase.backend_waiting = max(phase.backend_waiting, float(line.split()[-1]))
            await asyncio.sleep(0.25)


def start_delay(args: argparse.Namespace, i: int, service: float) -> float:
    """When the flood's request ``i`` starts: the first CAP spread over one service time,
    evenly or at random, or all at once; the rest after them, to wait in the queue."""
    if args.start == "lockstep":
        return 0.0
    if args.start == "random":
        return random.uniform(0.0, service) if i < args.cap else service
    cap: int = args.cap
    return min(i, cap) * service / cap


def cpu_seconds(gateway: int) -> dict[str, float]:
    """CPU seconds used so far by the gateway, the backend (its children, the reaper and the
    server) and this load generator: on a shared 2-core machine, who had the cores."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    def tree(pid: int) -> list[int]:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        return [k for kid in kids for k in (int(kid), *tree(int(kid)))]

    return {
        "gateway": used(gateway),
        "backend": sum(used(pid) for pid in tree(gateway)),
        "load": sum(os.times()[:2]),
    }


async def queue_only(args: argparse.Namespace, phase: Phase) -> None:
    """The same phase against the queue alone (``backends.queues``), in this process: the
    backend is a semaphore of CAP turns of the service time, first come first served, and
    nothing else runs, so what is measured is the queue's order, not the machine's noise.
    ``--jitter-ms J`` adds a uniform -J..J to each service time: the small differences that
    let the ends of the requests in flight drift apart over time, as they do end to end."""
    reserved = ((parse(phase.priority_b.encode()), args.pair),) if phase.reserved else ()
    cap = args.cap if phase.capped else None
    limits = QueueLimits(max_in_flight=cap, max_waiting=None, reserved=reserved)
    queue, backend = ModelQueue(MODEL, limits), asyncio.Semaphore(args.cap)
    service, stop = args.service_ms / 1000, asyncio.Event()
    jitter = args.jitter_ms / 1000
    a_done = [0]
    latencies: list[float] = []

    async def one(key: str, priority: str, done: list[float] | None, delay: float) -> None:
        await asyncio.sleep(delay)
        while not stop.is_set():
            began = time.monotonic()
            slot = await queue.admit(parse(priority.encode()), key)
            async with backend:
                await asyncio.sleep(service + random.uniform(-jitter, jitter))
            slot.release()
            if done is None:
                a_done[0] += 1
            elif began >= record_after:
                done.append(time.monotonic() - began)

    tasks = []
    if phase.flood:
        tasks += [
            asyncio.create_task(one("a", phase.priority_a, None, start_delay(args, i, service)))
            for i in range(args.flood)
        ]
        await asyncio.sleep(service * 2 + 1.0)
    record_after = time.monotonic() + 1.0
    tasks += [
        asyncio.create_task(one("b", phase.priority_b, latencies, 0.0)) for _ in range(args.pair)
    ]
    await asyncio.sleep(record_after - time.monotonic())
    before = a_done[0]
    await asyncio.sleep(args.seconds)
    phase.a_done += a_done[0] - before
    phase.seconds += time.monotonic() - record_after
    stop.set()
    await asyncio.wait(tasks, timeout=max(60.0, service * args.flood))
    phase.b += latencies
    phase.rounds.append(latencies)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm", action="store_true", help="vLLM's CPU build, not the fake")
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--pair", type=int, default=2)
    parser.add_argument("--cap", type=int, default=8, help="queue.max_in_flight (and the fake's)")
    parser.add_argument("--service-ms", type=float, default=200.0, help="the fake's service time")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="of each phase, each round")
    parser.add_argument("--rounds", type=int, default=1, help="the phases, taking turns")
    parser.add_argument(
        "--start",
        choices=("spread", "random", "lockstep"),
        default="spread",
        help="when the flood's first CAP requests start (see the docstring)",
    )
    parser.add_argument("--ready", type=float, default=600.0, help="seconds to wait for a start")
    parser.add_argument("--phases", default=",".join(p.name for p in PHASES))
    parser.add_argument("--queue-only", action="store_true", help="the queue alone, in-process")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="queue-only: service +-J")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    phases = [p for p in PHASES if p.name in args.phases.split(",")]
    assert phases[0].name == "alone", "every phase is compared with B alone"
    if args.queue_only:
        for _ in range(args.rounds):
            for phase in phases:
                await queue_only(args, phase)
        return write(args, phases, None)
    gw = Gateway(args)
    try:
        gw.ready(args.ready)
        service = args.service_ms / 1000
        for round_ in range(1, args.rounds + 1):  # phases take turns: the machine's noise
            for phase in phases:  # then falls on each of them alike
                await run_phase(gw, args, phase, service, f"{round_}{phase.name[:3]}")
                if phase.name == "alone" and args.vllm:  # vLLM's service time, as B saw it
                    service = statistics.median(phase.b)
                last = phase.rounds[-1]
                print(
                    f"{round_} {phase.name}: B p50 {pct(last, 0.5) * 1000:.0f} ms, "
                    f"p99 {pct(last, 0.99) * 1000:.0f} ms, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        gw.close()
    write(args, phases, gw.log)


def write(args: argparse.Namespace, phases: list[Phase], log: Path | None) -> None:
    parts = [summary(phases, args.flood, args.pair), verdicts(phases), by_round(phases)]
    if log is not None:
        parts.append(breakdown(phases, log))
    table = "\n\n".join(part for part in parts if part)
    print(table)
    if args.out is not None:
        with args.out.open("a") as out:
            out.write(f"\n`{' '.join(sys.argv)}`\n\n{table}\n")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
