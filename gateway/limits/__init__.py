"""Per-key limits (`requests_per_minute`, `max_concurrent`), exact wherever they are counted.

    store.py        what every store does (``LimitsStore``), the bucket arithmetic
    local.py        in this process: the default, one gateway process
    shared.py       the workers of one host: a locked table in shared memory, no network hop
    redis_store.py  every replica that names the same Redis (`limits_store: redis://...`)
    build.py        which one a process uses

The control plane of `workers: N` creates the host's table before its workers start, hands
each its descriptor and its column, and zeroes a dead worker's column before its successor
starts (``gateway.workers.limits``). Any other process may attach to a table by
``SharedTable.env(i)`` in its environment (``build.limits_store`` reads it), as
load/limits.py does with two standalone gateways; see ``gateway.limits.shared``.
"""
