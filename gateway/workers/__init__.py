"""`workers: N`: N relay processes on one port, one control plane beside them (docs/scale-out.md).

    control plane (the `serve` process)          workers (`python -m gateway worker`)
      create_app: supervisor, health, on-demand,   mirror.py    the models and replicas, as
        swaps, reload, the control API on a                     pushed; picks by their states
        private unix socket                        relay        every relayed path, its keys,
      plane.py      push states, settle drains,                 limits (limits.py) and CORS
                    answer starts, sum the shares  turns.py     a model's queue: each turn
      turn_book.py  the turns its queues gave                   asked of the control plane
      processes.py  start workers, restart them    forward.py   every other path, passed on
                                                                to the control plane
      counters.py   the in-flight table (shared memory): a row per worker, a column per replica
      limits.py     the per-key limits table (shared memory): a row per key, a column per worker
      channel.py    one line of JSON messages per worker; snapshot.py its documents
      listener.py   the port: one SO_REUSEPORT socket per worker; shares.py /metrics summed

`workers: 1`, the default, is none of this: one process, as before.
"""
