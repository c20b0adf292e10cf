#!/usr/bin/env bash
# The README demo: build the environment and the tiny models, start the gateway in spawn mode
# on config/cpu-demo.yaml (three real vLLM CPU servers, a fourth on demand), send a few example requests, and leave
# the gateway running on http://127.0.0.1:8000 until Ctrl-C. DEMO_EXIT=1 stops after the examples.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
py=.venv/bin/python
"$py" -m gateway tiny-models .cache/tiny-models
mkdir -p logs
echo "gateway log: logs/gateway.log; each vLLM server logs to logs/<model>.log"
"$py" -m gateway serve --config config/cpu-demo.yaml > logs/gateway.log 2>&1 &
gateway=$!
trap 'kill -TERM $gateway 2>/dev/null; wait $gateway 2>/dev/null || true' EXIT
trap 'exit 0' INT TERM
"$py" scripts/demo_requests.py http://127.0.0.1:8000
if [ -z "${DEMO_EXIT:-}" ]; then
  echo "The gateway keeps running on http://127.0.0.1:8000 (Ctrl-C stops it and every vLLM server)."
  wait $gateway
fi
