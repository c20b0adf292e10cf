"""What `balance: prefix` costs per request: the choice alone, and the gateway's CPU as a whole.

    .venv/bin/python load/prefix_cost.py [--rounds 4] [--seconds 3] [--base REV] [--out FILE]
    .venv/bin/python load/prefix_cost.py --instructions 2000 [--base REV]   # needs valgrind

1. The choice, in this process: 8 replicas whose index remembers 10,000 conversations (system
   prompts of about 660 tokens, ~2.6 KB), then a chat request of another turn of one of them:
   rendering, hashing and ``pick`` against ``pick`` by least outstanding alone.
2. The gateway's CPU per request against fake upstreams (load/bench.py's measure): gateways
   over the same 8 fake replicas (127.0.0.1-8, one port), one per policy, taking turns for
   ``--rounds`` rounds (each round in the other order), 16 requests at once. Each gateway is
   first sent the first turn of 10,000 conversations, so the prefix gateway's index remembers
   them all; the measured requests are later turns of 1,000 of those conversations, each
   connection sending them in turn; what is compared is the median of each round's ratio.
   With ``--base REV``, a third gateway runs `prefix` from that git revision (in a temporary
   worktree), in the same rounds: a change to the index measured side by side.
   With ``--instructions N``, each gateway runs under valgrind's callgrind instead, and the
   instructions it executes for N such requests are counted: a measure a busy machine does not
   move, where CPU time on a shared machine moves by tens of percent from one round to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import Scenario, measure
from loadgen import Result, build_request, read_response
from peers import BENCH_KEY, ROOT, Target, checkout, pinned, wait_http

from backends.pool import Replica, ReplicaPool
from backends.prefix_index import PrefixPolicy, PrefixRouter
from backends.process import free_port
from gateway.prompt_prefix import prompt_hashes

REPLICAS, CONVERSATIONS, SYSTEM_BYTES = 8, 10_000, 2640
ASKED = 1_000  # conversations whose later turns are measured
# Free ports, not fixed ones: other benchmarks may run on this machine at the same time.
FAKE_PORT, LEAST_PORT, PREFIX_PORT, BASE_PORT = (free_port() for _ in range(4))


def conversation(rng: random.Random, index: int) -> dict[str, object]:
    words = " ".join(rng.choice(("tide", "berth", "pilot", "cargo", "quay")) for _ in range(600))
    system = f"Conversation {index}. {words}"[:SYSTEM_BYTES]
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "When is high tide?"},
            {"role": "assistant", "content": "At six."},
            {"role": "user", "content": "And the pilot?"},
        ],
    }


def next_turn(body: dict[str, object]) -> dict[str, object]:
    messages = list(body["messages"])  # type: ignore[call-overload]
    answer = [{"role": "assistant", "content": "At half past."}, {"role": "user", "content": "?"}]
    return {**body, "messages": messages + answer}


def choice_cost(rounds: int = 7, picks: int = 5_000) -> tuple[float, float, int]:
    """Microseconds per request of least outstanding's pick and prefix's whole choice (median
    of rounds that alternate the two), and the blocks the index holds."""
    rng = random.Random(1)
    replicas = [Replica(url=f"http://r{i}") for i in range(REPLICAS)]
    least = ReplicaPool("m", replicas)
    prefix = ReplicaPool("m", replicas, policy="prefix", prefix=PrefixRouter())
    bodies = [conversation(rng, i) for i in range(CONVERSATIONS)]
    for body in bodies:
        prefix.pick(prompt=prompt_hashes(prefix, body, None))
    assert prefix.prefix is not None
    held = sum(prefix.prefix.remembered(r) for r in replicas)
    asked = [bodies[rng.randrange(CONVERSATIONS)] for _ in range(picks)]
    least_us, prefix_us = [], []
    for _ in range(rounds):
        started = time.process_time()
        for _ in asked:
            least.pick()
        least_us.append((time.process_time() - started) / picks * 1e6)
        started = time.process_time()
        for body in asked:
            prefix.pick(prompt=prompt_hashes(prefix, body, None))
        prefix_us.append((time.process_time() - started) / picks * 1e6)
    return median(least_us), median(prefix_us), held


def start_gateway(
    port: int,
    balance: str,
    workdir: Path,
    name: str = "",
    root: Path = ROOT,
    under: list[str] | None = None,
) -> Target:
    """``root``: the checkout whose code runs; ``under``: a command it runs under (valgrind)."""
    name = name or balance
    urls = [f"http://127.0.0.{i + 1}:{FAKE_PORT}" for i in range(REPLICAS)]
    health: dict[str, float] = {"timeout": 30}
    if under:
        health["interval"] = 3600  # a cost per second, billed to the requests under valgrind
    config = {
        "models": [{"name": "m", "urls": urls, "balance": balance, "health": health}],
        "api_keys": [BENCH_KEY],
        "log_level": "info",
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["serve", "--config", str(path), "--port", str(port)]
    if under:
        cmd = [*under, sys.executable, "-c", WITHOUT_SCRAPES, *args]
    else:
        cmd = pinned(1, [sys.executable, "-m", "gateway", *args])
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    target = Target(name, port, [proc], {"Authorization": f"Bearer {BENCH_KEY}"})
    wait_http(f"{target.url}/health", 900 if under else 60)
    return target


# The gateway, less the status page's scrape of each replica's /metrics every 5 s: a cost per
# second, not per request, which valgrind's slowdown would bill to each request many times over.
WITHOUT_SCRAPES = (
    "import asyncio, sys; import backends.vllm_load as v; "
    "v.LoadScraper.start = lambda self: asyncio.sleep(0); "
    "from gateway.commands.cli import main; sys.exit(main(sys.argv[1:]))"
)


def fill(target: Target, bodies: list[dict[str, object]], concurrency: int = 16) -> None:
    """Send each body once, ``concurrency`` at a time: the prefix index learns them all."""
    import asyncio

    url = f"{target.url}/v1/chat/completions"
    requests = [build_request(url, json.dumps(b).encode(), target.headers) for b in bodies]
    host, port = requests[0][0], requests[0][1]

    async def one_connection(share: list[bytes]) -> int:
        reader, writer = await asyncio.open_connection(host, port)
        refused = 0
        for request in share:
            writer.write(request)
            refused += not await read_response(reader, time.perf_counter(), Result())
        writer.close()
        return refused

    async def send() -> int:
        raw = [r for _, _, r in requests]
        shares = [raw[i::concurrency] for i in range(concurrency)]
        return sum(await asyncio.gather(*(one_connection(share) for share in shares)))

    if refused := asyncio.run(send()):
        raise RuntimeError(f"{target.name}: {refused} of the requests were refused")


@contextlib.contextmanager
def fakes() -> Iterator[None]:
    """The 8 fake replicas (127.0.0.1-8, one port), on CPU 0."""
    procs = [
        subprocess.Popen(
            pinned(
                0,
                [
                    sys.executable,
                    str(ROOT / "tests" / "fake_vllm.py"),
                    "--host",
                    f"127.0.0.{i + 1}",
                    "--port",
                    str(FAKE_PORT),
                    "--served-model-name",
                    "m",
                ],
            ),
            stdout=subprocess.DEVNULL,
        )
        for i in range(REPLICAS)
    ]
    try:
        for i in range(REPLICAS):
            wait_http(f"http://127.0.0.{i + 1}:{FAKE_PORT}/health")
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def workloads(conversations: int) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """The first turns of ``conversations`` conversations, and later turns of ASKED of them."""
    rng = random.Random(2)
    bodies = [conversation(rng, i) for i in range(conversations)]
    return bodies, [next_turn(bodies[rng.randrange(conversations)]) for _ in range(ASKED)]


def builds(base: Path | None) -> list[tuple[str, str, Path]]:
    """(name, balance, checkout) of each gateway measured."""
    found = [("least_outstanding", "least_outstanding", ROOT), ("prefix", "prefix", ROOT)]
    return found + ([("prefix (base)", "prefix", base)] if base is not None else [])


def gateway_cost(
    rounds: int, seconds: float, base: Path | None, conversations: int = CONVERSATIONS
) -> dict[str, list[float]]:
    workdir = Path(tempfile.mkdtemp())
    targets: list[Target] = []
    with fakes():
        try:
            ports = (LEAST_PORT, PREFIX_PORT, BASE_PORT)
            for port, (name, balance, root) in zip(ports, builds(base), strict=False):
                targets.append(start_gateway(port, balance, workdir, name, root))
            bodies, asked = workloads(conversations)
            for target in targets:
                fill(target, bodies)
            scenario = Scenario(
                "later turns, 2.7 KB prompts c=16", 16, asked[0], others=tuple(asked[1:])
            )
            cpu: dict[str, list[float]] = {t.name: [] for t in targets}
            for round_ in range(rounds):
                # In turn first and last: a harness whose second slot measured 3-6 % above
                # its first with the same gateway in both (an A/A run) is not read as a cost.
                for target in targets if round_ % 2 == 0 else targets[::-1]:
                    row = measure(target, scenario, seconds)
                    cpu[target.name].append(row["cpu_us_per_request"])
                    load = os.getloadavg()[0]
                    print(f"{round_ + 1}/{rounds} {target.name:>18}: {row['rps']:6.0f} rps, "
                          f"{row['cpu_us_per_request']:6.0f} µs CPU/request, "
                          f"{row['errors']} errors, load {load:.1f}", flush=True)  # fmt: skip
            return cpu
        finally:
            for target in targets:
                for proc in target.procs:
                    proc.terminate()
                    proc.wait(60)


def instructions(base: Path | None, conversations: int, requests: int) -> dict[str, float]:
    """Instructions per measured request of each gateway, counted by valgrind's callgrind:
    the same on a busy machine as on a quiet one. Counting starts after the gateway learnt
    ``conversations`` first turns and stops after ``requests`` later turns (16 at a time)."""
    workdir = Path(tempfile.mkdtemp())
    callgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={workdir}/%p.out",
    ]
    bodies, asked = workloads(conversations)
    measured = [asked[i % len(asked)] for i in range(requests)]
    counted: dict[str, float] = {}
    with fakes():
        for name, balance, root in builds(base):
            target = start_gateway(BASE_PORT, balance, workdir, name, root, callgrind)
            (proc,) = target.procs
            try:
                fill(target, bodies)
                control, pid = "callgrind_control", str(proc.pid)
                subprocess.run([control, "-i", "on", pid], check=True, capture_output=True)
                fill(target, measured)
                subprocess.run([control, "-d", pid], check=True, capture_output=True)
            finally:
                proc.terminate()
                proc.wait(300)
            dumps = sorted(workdir.glob(f"{proc.pid}.out.*"))
            totals = re.search(r"^totals: (\d+)", dumps[0].read_text(), re.MULTILINE)
            assert totals is not None, f"no totals in {dumps[0]}"
            counted[name] = int(totals.group(1)) / requests
            print(f"{name:>18}: {counted[name]:,.0f} instructions/request", flush=True)
    return counted


def paired(values: list[float], against: list[float]) -> float:
    """The median of each round's ratio: a round's two gateways ran seconds apart, under
    about the same load, so what a shared machine's load does between rounds cancels."""
    return median(v / a for v, a in zip(values, against, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--base", help="also measure `prefix` at this git revision")
    parser.add_argument(
        "--conversations", type=int, default=CONVERSATIONS, help="remembered by the gateways"
    )
    parser.add_argument("--skip-choice", action="store_true", help="the gateways only")
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="count each gateway's instructions over N requests under valgrind, instead of "
        "its CPU time",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})  # with the fakes; the gateways have CPU 1
    lines = []
    if not args.skip_choice:
        least_us, prefix_us, held = choice_cost()
        lines.append(
            f"1. The choice: {REPLICAS} replicas, {CONVERSATIONS} conversations remembered "
            f"({held} blocks of {PrefixPolicy().block_bytes} bytes); least outstanding's pick "
            f"{least_us:.1f} µs, prefix's render + hash + pick {prefix_us:.1f} µs "
            f"(+{prefix_us - least_us:.1f} µs a request)."
        )
        print(lines[0], flush=True)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(checkout(args.base)) if args.base else None
        if args.instructions:
            counted = instructions(base, args.conversations, args.instructions)
            least = counted["least_outstanding"]
            text = ", ".join(
                f"{name} {value:,.0f} ({(value / least - 1) * 100:+.1f} %)"
                for name, value in counted.items()
                if name != "least_outstanding"
            )
            lines.append(
                f"2. Instructions per request (callgrind), {args.conversations} conversations "
                f"remembered, {args.instructions} requests: least_outstanding {least:,.0f}, "
                f"{text}."
            )
        else:
            cpu = gateway_cost(args.rounds, args.seconds, base, args.conversations)
            baseline = cpu["least_outstanding"]
            least = median(baseline)
            text = ", ".join(
                f"{name} {median(values):.0f} µs ({(median(values) / least - 1) * 100:+.1f} %; "
                f"each round's ratio, median: {(paired(values, baseline) - 1) * 100:+.1f} %)"
                for name, values in cpu.items()
                if name != "least_outstanding"
            )
            rounds = "; ".join(
                f"{name} {', '.join(f'{v:.0f}' for v in values)}" for name, values in cpu.items()
            )
            lines.append(
                f"2. The gateway's CPU per request, {args.conversations} conversations "
                f"remembered, median of {args.rounds} rounds: least_outstanding {least:.0f} µs, "
                f"{text}; rounds: {rounds}."
            )
    print(lines[-1])
    if args.out:
        command = "    .venv/bin/python load/prefix_cost.py " + " ".join(sys.argv[1:])
        args.out.write_text(command + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
