#!/usr/bin/env bash
# The whole test suite: builds the environment if needed, then fast tests first while the real
# vLLM CPU servers load in the background, then the integration tests against them.
# Extra arguments go to pytest. Exit 5 (no tests collected) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
export PYTHONUNBUFFERED=1
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"
