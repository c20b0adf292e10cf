"""One worker process on a shared limits table, for test_shared.py.

    VLLM_GATEWAY_LIMITS_TABLE=... python table_worker.py TRIES RPM MAX_CONCURRENT   (0: none)
    VLLM_GATEWAY_LIMITS_TABLE=... python table_worker.py churn KEYS ROUNDS

Attaches as the control plane's environment says (with the table's descriptor inherited).
It says `ready`, waits for a line on stdin (so the workers start together), then works, prints
what it got, and holds its slots until stdin closes.

- TRIES RPM MAX_CONCURRENT: tries to admit TRIES requests of the key `shared` (keeping every
  slot it gets) and prints how many it got. Its clock stands still: no token comes back.
- churn KEYS ROUNDS: in round r its clock reads r * CHURN_ROUND_SECONDS, so every row of an
  earlier round is stale; it admits and releases keys `r-0` .. `r-<KEYS - 1>` (each a slot of
  `max_concurrent: KEYS`), and in the last round admits them and keeps the slots. Prints
  `done`. The workers' rounds are not in step: rows a worker uses are freed under it and
  claimed by other keys (or the same key, by another worker) all the while.
"""

from __future__ import annotations

import os
import sys

from gateway.errors import RateLimited
from gateway.keys import ApiKey
from gateway.limits.shared import LIMITS_TABLE_ENV, SharedLimits, attach_shared_table

CHURN_ROUND_SECONDS = 100.0


def churn_key(round_: int, i: int, keys: int) -> ApiKey:
    return ApiKey(f"{round_}-{i}", b"x" * 32, None, None, keys)


def main() -> None:
    worker, _, where = os.environ[LIMITS_TABLE_ENV].partition(":")
    clock = [0.0]
    limits = attach_shared_table(where, int(worker), clock=lambda: clock[0])
    print("ready", flush=True)
    sys.stdin.readline()
    if sys.argv[1] == "churn":
        churn(limits, clock, int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(admitted(limits, *map(int, sys.argv[1:4])), flush=True)
    sys.stdin.read()


def admitted(limits: SharedLimits, tries: int, rpm: int, concurrent: int) -> int:
    key = ApiKey("shared", b"x" * 32, None, rpm or None, concurrent or None)
    got = 0
    for _ in range(tries):
        try:
            limits.admit(key)
            got += 1
        except RateLimited:
            pass
    return got


def churn(limits: SharedLimits, clock: list[float], keys: int, rounds: int) -> None:
    for round_ in range(rounds):
        clock[0] = round_ * CHURN_ROUND_SECONDS
        for i in range(keys):
            key = churn_key(round_, i, keys)
            limits.admit(key)
            if round_ < rounds - 1:
                limits.release(key)
    print("done", flush=True)


if __name__ == "__main__":
    main()
