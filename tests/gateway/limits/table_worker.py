"""One worker process on a shared limits table, for test_shared.py.

    VLLM_GATEWAY_LIMITS_TABLE=... python table_worker.py TRIES RPM MAX_CONCURRENT   (0: none)

Attaches as the control plane's environment says (with the table's descriptor inherited).
It says `ready`, waits for a line on stdin (so the workers start together), tries to admit TRIES
requests of the key `shared` (keeping every slot it gets), prints how many it got, then holds
them until stdin closes. Its clock stands still: no token comes back while it runs.
"""

from __future__ import annotations

import os
import sys

from gateway.errors import RateLimited
from gateway.keys import ApiKey
from gateway.limits.shared import LIMITS_TABLE_ENV, attach_shared_table


def main() -> None:
    tries, rpm, concurrent = sys.argv[1:4]
    worker, _, where = os.environ[LIMITS_TABLE_ENV].partition(":")
    limits = attach_shared_table(where, int(worker), clock=lambda: 0.0)
    key = ApiKey("shared", b"x" * 32, None, int(rpm) or None, int(concurrent) or None)
    print("ready", flush=True)
    sys.stdin.readline()
    got = 0
    for _ in range(int(tries)):
        try:
            limits.admit(key)
            got += 1
        except RateLimited:
            pass
    print(got, flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
