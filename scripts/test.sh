#!/usr/bin/env bash
# The whole test suite: builds the environment if needed, then fast tests first while the real
# vLLM CPU servers load in the background, then the integration tests against them.
# Extra arguments go to pytest. Exit 5 (no tests collected) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
# Client libraries that pin an older openai than vLLM's get an environment of their own; the
# client tests run their scripts (tests/integration/clients/) with its python.
CLIENTS_VENV=.venv-clients  # where tests/integration/test_clients.py looks for it
CLIENT_PACKAGES="litellm llama_index.llms.openai_like llama_index.embeddings.openai_like"
if ! "$CLIENTS_VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" $CLIENT_PACKAGES 2>/dev/null; then
  echo "test.sh: building $CLIENTS_VENV (LlamaIndex, LiteLLM)"
  python3 -m venv "$CLIENTS_VENV"
  "$CLIENTS_VENV/bin/python" -m pip --disable-pip-version-check -q install \
    "llama-index-llms-openai-like>=0.8" "llama-index-embeddings-openai-like>=0.4" "litellm>=1.70"
fi
# The CPU image (tests/deploy/test_image.py runs it): built here, before pytest, since a cold
# build (tools, Debian base, vLLM's layers) takes longer than a test may wait; the test's own
# build then reuses every layer.
scripts/image.sh build
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
