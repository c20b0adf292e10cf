"""Where `balance: prefix`'s choice spends its instructions, piece by piece (needs valgrind).

    .venv/bin/python load/prefix_choice_instructions.py [--conversations 2000] [--base REV]

In process, 8 replicas whose index holds ``--conversations`` conversations (load/prefix_cost.py's
system prompts of 2.6 KB), then 1,000 later turns of them, each learnt once before counting,
so that every counted choice finds its prompt held and recent. Each piece runs under
callgrind in a process of its own, counted only around 3 passes over the 1,000 bodies:
parsing the body alone, then with least outstanding's pick, with the rendering, with the
rendering and the block hashes, and with the whole prefix choice. The differences are the
pieces; ``--base REV`` counts that git revision's code the same way, beside this checkout's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ROOT, checkout

PIECES = ("parse", "least", "render", "hashes", "prefix")
PASSES, ASKED = 3, 1_000


def count(piece: str, conversations: int) -> None:
    """In the process valgrind runs: build the index, then run ``piece`` counted."""
    sys.path.insert(0, os.getcwd())  # the code counted: the checkout valgrind runs in
    import random

    import orjson

    from backends.pool import Replica, ReplicaPool
    from backends.prefix_index import PrefixRouter
    from gateway.prompt_prefix import prompt_hashes, render

    # After those: the workload's module puts this checkout first on the path.
    workload = importlib.import_module("prefix_cost")
    conversation, next_turn = workload.conversation, workload.next_turn

    rng = random.Random(1)
    replicas = [Replica(url=f"http://r{i}") for i in range(workload.REPLICAS)]
    least = ReplicaPool("m", replicas)
    prefix = ReplicaPool("m", replicas, policy="prefix", prefix=PrefixRouter())
    bodies = [conversation(rng, i) for i in range(conversations)]
    for body in bodies:
        prefix.pick(prompt=prompt_hashes(prefix, body, None))
    asked = [orjson.dumps(next_turn(bodies[rng.randrange(conversations)])) for _ in range(ASKED)]
    for raw in asked:
        prefix.pick(prompt=prompt_hashes(prefix, orjson.loads(raw), None))
    steps = {
        "parse": lambda doc: None,
        "least": lambda doc: least.pick(),
        "render": render,
        "hashes": lambda doc: prompt_hashes(prefix, doc, None),
        "prefix": lambda doc: prefix.pick(prompt=prompt_hashes(prefix, doc, None)),
    }
    step, loads = steps[piece], orjson.loads
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    for _ in range(PASSES):
        for raw in asked:
            step(loads(raw))
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)


def counted(root: Path, piece: str, conversations: int, workdir: Path) -> float:
    """Instructions per request of ``piece`` with ``root``'s code."""
    out = workdir / f"{root.name}-{piece}.out"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--count",
        piece,
        "--conversations",
        str(conversations),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    totals = [
        re.search(r"^totals: (\d+)", p.read_text(), re.M) for p in workdir.glob(out.name + "*")
    ]
    return sum(int(t.group(1)) for t in totals if t) / (PASSES * ASKED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=2_000)
    parser.add_argument("--base", help="also count this git revision's code")
    parser.add_argument("--count", choices=PIECES, help=argparse.SUPPRESS)  # under valgrind
    args = parser.parse_args()
    if args.count:
        count(args.count, args.conversations)
        return
    workdir = Path(tempfile.mkdtemp())
    with contextlib.ExitStack() as stack:
        roots = [("this checkout", ROOT)]
        if args.base:
            roots.append((args.base, stack.enter_context(checkout(args.base))))
        for name, root in roots:
            n = {p: counted(root, p, args.conversations, workdir) for p in PIECES}
            print(
                f"{name}: least outstanding's pick {n['least'] - n['parse']:,.0f}; render "
                f"{n['render'] - n['parse']:,.0f}, block hashes {n['hashes'] - n['render']:,.0f}, "
                f"pick {n['prefix'] - n['hashes']:,.0f}: prefix adds "
                f"{n['prefix'] - n['least']:,.0f} instructions a request",
                flush=True,
            )


if __name__ == "__main__":
    main()
