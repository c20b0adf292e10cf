"""vLLM's CPU build as a sleep-mode server, for the tests: the launcher of a gateway whose
on-demand models sleep (`launcher: [python, -m, tests.integration.cpu_sleep]`).

The CPU build refuses `--enable-sleep-mode` ("Sleep mode is not supported on current
platform"), but with `VLLM_SERVER_DEV_MODE=1` it serves `/sleep`, `/wake_up` and
`/is_sleeping` all the same: its CPU worker's sleep and wake free and load nothing (it logs
"sleep mode is not supported on CPU, ignore it"), while its engine pauses and reports itself
asleep until woken. So this drops the flag and starts vLLM's API server: the gateway's side
of sleep mode (putting a server to sleep, keeping it across a gateway restart, adopting and
waking it) runs against a real vLLM. What sleep frees is a GPU's to show (load/gpu_sleep.py).
"""

from __future__ import annotations

import runpy
import sys

SLEEP_MODE = "--enable-sleep-mode"

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *(arg for arg in sys.argv[1:] if arg != SLEEP_MODE)]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
