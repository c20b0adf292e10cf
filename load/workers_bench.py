"""`workers: N` against nginx with as many workers: requests per second and CPU per request.

    .venv/bin/python load/workers_bench.py [--workers 1,2,4,8] [--seconds 5] [--rounds 2]
        [--scenarios "chat c=256,stream c=256"] [--fakes 4] [--clients 4] [--nginx PATH]

Every target runs side by side and they take turns, scenario by scenario, ``--rounds`` times
(as load/bench.py does, so a drift in the machine's speed biases none of them). A target of W
workers gets cores 0..W-1 to itself: a gateway's control plane and its W workers, or nginx's
master and its W workers. The fake vLLM servers (``--fakes`` of them, the model's replicas,
balanced by the gateway and by nginx alike) and the load clients (``--clients`` processes,
each a closed loop over its share of the connections) get the cores above the largest W, so
that neither is what runs out first. On a machine with fewer cores everything shares them
(the report says so): the numbers then show the protocol working, not its scaling.

Needs only the repository and its virtual environment (nginx, when it is installed, or
``--nginx``); writes load/results/workers-scaling-<date>.md and the raw rows beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cpu_seconds
from loadgen import Result, run
from peers import BENCH_KEY, NGINX_CONF, ROOT, Target, wait_http

FAKE_PORT, TARGET_PORT = 19401, 19420
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
SCENARIOS = {
    "chat c=256": (256, CHAT),
    "stream c=256": (256, {**CHAT, "stream": True, "fake": {"chunks": 16}}),
    "chat c=64": (64, CHAT),
}


def cores(first: int, count: int) -> list[int]:
    total = os.cpu_count() or 1
    return [(first + i) % total for i in range(count)]


def physical_cores() -> list[list[int]]:
    """Logical CPUs grouped by the core they share (hyperthreads), from sysfs."""
    groups: dict[str, list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            siblings = path.read_text().strip()
        except OSError:
            siblings = str(cpu)
        groups.setdefault(siblings, []).append(cpu)
    return list(groups.values())


def placement(targets: int, helpers: int) -> tuple[list[int], list[int], str]:
    """Cores for the targets (in the order a target of W workers takes its first W) and for the
    fakes and load clients: helpers take whole physical cores from the top, so that no target's
    worker shares a core's execution units with them; targets take one thread of each remaining
    core before any core's second thread."""
    phys = physical_cores()
    threads = max(len(group) for group in phys)
    need = -(-helpers // threads)  # physical cores for the helpers
    helper_cpus = [cpu for group in phys[len(phys) - need :] for cpu in group][:helpers]
    rest = phys[: len(phys) - need]
    target_cpus = [group[t] for t in range(threads) for group in rest if t < len(group)]
    shape = f"{sum(map(len, phys))} logical CPUs on {len(phys)} cores of {threads} threads"
    if len(target_cpus) < targets:
        shape += f"; targets above {len(target_cpus)} workers share cores with fakes and clients"
        target_cpus += [c for c in cores(0, len(phys) * threads) if c not in target_cpus]
    return target_cpus, helper_cpus, shape


def taskset(cpus: list[int], cmd: list[str]) -> list[str]:
    if shutil.which("taskset") is None:
        return cmd  # unpinned: the report's layout line is then a wish
    return ["taskset", "-c", ",".join(map(str, cpus)), *cmd]


def start_fakes(count: int, cpus: list[int]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        cmd = [sys.executable, str(ROOT / "tests" / "fake_vllm.py"), "--port", str(FAKE_PORT + i)]
        cmd += ["--served-model-name", "fake"]
        procs.append(
            subprocess.Popen(taskset([cpus[i % len(cpus)]], cmd), stdout=subprocess.DEVNULL)
        )
    for i in range(count):
        wait_http(f"http://127.0.0.1:{FAKE_PORT + i}/health")
    return procs


def start_gateway(
    workers: int, port: int, upstreams: list[str], work: Path, cpus: list[int]
) -> Target:
    """As load/bench.py starts it (an API key, the access log on), with ``workers``."""
    import yaml

    config = {
        "models": [{"name": "fake", "urls": upstreams, "health": {"timeout": 30}}],
        "api_keys": [BENCH_KEY],
        "log_level": "info",
        "workers": workers,
    }
    path = work / f"gateway-{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = work / f"gateway-{workers}.log"
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    proc = subprocess.Popen(
        taskset(cpus[:workers], cmd),
        cwd=ROOT,
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    target = Target(f"gateway x{workers}", port, [proc], {"Authorization": f"Bearer {BENCH_KEY}"})
    deadline = time.monotonic() + 120
    while (
        log.read_text(errors="replace").count("Uvicorn running on http") < (workers > 1) * workers
    ):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise TimeoutError(f"{target.name} did not start; see {log}")
        time.sleep(0.2)
    wait_http(target.url + "/health")
    return target


def start_nginx(
    nginx: str, workers: int, port: int, upstreams: list[str], work: Path, cpus: list[int]
) -> Target:
    """nginx with ``workers`` worker processes on as many cores, its default accept."""
    home = work / f"nginx-{workers}"
    home.mkdir()
    servers = " ".join(f"server {u.removeprefix('http://')};" for u in upstreams)
    conf = NGINX_CONF.format(dir=home, upstream="UPSTREAM", port=port)
    conf = conf.replace("server UPSTREAM;", servers).replace(
        "worker_processes 1;", f"worker_processes {workers};"
    )
    (home / "nginx.conf").write_text(conf)
    cmd = [nginx, "-c", str(home / "nginx.conf"), "-p", str(home), "-g", "daemon off;"]
    log = home / "stderr.log"
    proc = subprocess.Popen(
        taskset(cpus[:workers], cmd),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115
    )
    target = Target(f"nginx x{workers}", port, [proc])
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            wait_http(target.url + "/health", timeout=1)
            return target
    errors = [f.read_text(errors="replace") for f in (log, home / "error.log") if f.exists()]
    raise RuntimeError(f"nginx x{workers} did not start: {' '.join(errors)}")


def _client(
    url: str, body: bytes, concurrency: int, seconds: float, headers: dict[str, str], cpu: int
) -> dict[str, Any]:
    """One load client process, on its own core (no warm-up of its own: ``measure``'s)."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpu})
    import uvloop

    uvloop.install()
    result = asyncio.run(run(url, body, concurrency, seconds, warmup=0.0, headers=headers))
    return {
        "latencies": result.latencies,
        "ttfb": result.ttfb,
        "events": result.events,
        "errors": result.errors,
        "seconds": result.seconds,
    }


def measure(
    target: Target,
    scenario: str,
    seconds: float,
    clients: ProcessPoolExecutor,
    client_cpus: list[int],
) -> dict[str, Any]:
    concurrency, doc = SCENARIOS[scenario]
    body = json.dumps(doc).encode()
    share = max(1, concurrency // len(client_cpus))
    url = f"{target.url}/v1/chat/completions"

    def load(how_long: float) -> list[dict[str, Any]]:
        calls = [(url, body, share, how_long, target.headers, cpu) for cpu in client_cpus]
        return list(clients.map(_client, *zip(*calls, strict=True)))

    load(1.0)  # warm-up: connections open, caches warm
    before = cpu_seconds(target.pids)
    parts = load(seconds)
    cpu = cpu_seconds(target.pids) - before
    merged = Result()
    for part in parts:
        merged.latencies += part["latencies"]
        merged.ttfb += part["ttfb"]
        merged.events += part["events"]
        merged.errors += part["errors"]
    merged.seconds = max(part["seconds"] for part in parts)
    row = merged.summary()
    row["cpu_us_per_request"] = cpu / max(1, row["requests"]) * 1e6
    return row


def report(
    rows: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace, layout: str
) -> str:
    def med(runs: list[dict[str, Any]], key: str) -> float:
        values = sorted(r[key] for r in runs)
        return float(values[len(values) // 2])

    lines = [
        f"# workers: N against nginx, {datetime.date.today().isoformat()}",
        "",
        f"Command: `.venv/bin/python load/workers_bench.py {' '.join(_shown(sys.argv[1:]))}`",
        "",
        f"Machine: {os.cpu_count()} cores; {layout}. Medians of {args.rounds} rounds of "
        f"{args.seconds:g} s each.",
        "",
    ]
    for scenario in args.scenarios.split(","):
        lines += [
            f"## {scenario}",
            "",
            "| target | rps | rate vs its 1 worker | p50 ms | p99 ms | CPU µs/request | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, by_scenario in rows.items():
            runs = by_scenario.get(scenario)
            if not runs:
                continue
            base_name = name.rsplit(" x", 1)[0] + " x1"
            base = rows.get(base_name, {}).get(scenario)
            ratio = med(runs, "rps") / med(base, "rps") if base else float("nan")
            lines.append(
                f"| {name} | {med(runs, 'rps'):.0f} | {ratio:.2f} | {med(runs, 'p50_ms'):.2f} "
                f"| {med(runs, 'p99_ms'):.2f} | {med(runs, 'cpu_us_per_request'):.0f} "
                f"| {sum(r['errors'] for r in runs)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _shown(argv: list[str]) -> list[str]:
    """The command line as the report shows it: no machine's paths (nginx's, the output's)."""
    shown, names = [], {"--nginx": "NGINX", "--out": "OUT"}
    for i, arg in enumerate(argv):
        shown.append(names[argv[i - 1]] if i and argv[i - 1] in names else arg)
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scenarios", default="chat c=256,stream c=256")
    parser.add_argument("--fakes", type=int, default=4, help="fake vLLM replicas")
    parser.add_argument("--clients", type=int, default=4, help="load client processes")
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument("--out", default=str(ROOT / "load" / "results"))
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    total = os.cpu_count() or 1
    spare = total - max(counts)
    if spare >= 2:
        helpers = min(spare, 2 * args.clients)
        target_cpus, helper_cpus, shape = placement(max(counts), helpers)
        fake_cpus = helper_cpus[: max(1, helpers // 2)]
        client_cpus = helper_cpus[len(fake_cpus) :][: args.clients]
        layout = (
            f"{shape}; a target of W workers on {target_cpus[: max(counts)]}[:W], "
            f"fakes on {fake_cpus}, load clients on {client_cpus}"
        )
    else:
        target_cpus = cores(0, total)
        fake_cpus = client_cpus = cores(0, min(total, args.clients))
        layout = "too few cores: targets, fakes and load clients share every core"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    fakes = start_fakes(args.fakes, fake_cpus)
    upstreams = [f"http://127.0.0.1:{FAKE_PORT + i}" for i in range(args.fakes)]
    targets: list[Target] = []
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for i, count in enumerate(counts):
            targets.append(start_gateway(count, TARGET_PORT + i, upstreams, work, target_cpus))
        if Path(args.nginx).exists():
            for i, count in enumerate(counts):
                port = TARGET_PORT + 10 + i
                targets.append(start_nginx(args.nginx, count, port, upstreams, work, target_cpus))
        else:
            layout += f"; nginx not found at {args.nginx}, not measured"
        with ProcessPoolExecutor(len(client_cpus)) as clients:
            for round_ in range(args.rounds):
                for scenario in args.scenarios.split(","):
                    for target in targets:
                        row = measure(target, scenario, args.seconds, clients, client_cpus)
                        rows.setdefault(target.name, {}).setdefault(scenario, []).append(row)
                        print(
                            f"{round_ + 1}/{args.rounds} {target.name:>12} | {scenario:<14} "
                            f"| {row['rps']:8.0f} rps | {row['cpu_us_per_request']:5.0f} µs",
                            flush=True,
                        )
    finally:
        for target in targets:
            target.stop()
        for fake in fakes:
            fake.terminate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    (out / f"workers-scaling-{stamp}.json").write_text(json.dumps(rows))
    text = report(rows, args, layout)
    (out / f"workers-scaling-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
