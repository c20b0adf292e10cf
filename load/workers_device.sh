#!/usr/bin/env bash
# load/workers_bench.py on a machine with no network and no venv (the 16-core GPU machine).
#
#   load/workers_device.sh bundle     here: the gateway's wheels that machine's Python 3.12
#                                     image lacks, and this machine's nginx, into .whl/ (ignored)
#   load/workers_device.sh run [ARGS] there, from the repo root with .whl carried: install the
#                                     wheels into /tmp/site, run the bench (ARGS go to it),
#                                     results into $OUT (or load/results)
set -euo pipefail
case ${1:-} in
bundle)
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
  for p in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do plat+=(--platform "manylinux_${p}_x86_64"); done
  plat+=(--platform manylinux2014_x86_64 --platform linux_x86_64 --platform any)
  mkdir -p .whl/lib
  .venv/bin/python -m pip download -q --no-deps -d .whl "${plat[@]}" fastapi starlette uvicorn \
    httptools pydantic pydantic_core annotated-types typing-inspection orjson \
    prometheus-fastapi-instrumentator opentelemetry-api importlib-metadata zipp \
    opentelemetry-sdk opentelemetry-semantic-conventions typing-extensions xxhash pyyaml \
    httpx httpcore h11 anyio sniffio idna certifi
  nginx=$(command -v nginx || echo /usr/sbin/nginx)
  cp "$nginx" .whl/nginx
  for lib in $(ldd "$nginx" | awk '/=>/{print $3}' | grep -v 'libc\.so'); do cp -L "$lib" .whl/lib/; done
  du -sh .whl ;;
run)
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  chmod +x .whl/nginx
  nginx=$PWD/.whl/nginx
  if ! "$nginx" -v 2>/dev/null; then  # its libraries, where the image has other versions
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/.whl/lib exec %s "$@"\n' "$PWD" "$nginx" > /tmp/nginx.sh
    chmod +x /tmp/nginx.sh
    nginx=/tmp/nginx.sh
  fi
  python3 load/workers_bench.py --nginx "$nginx" --out "${OUT:-load/results}" "$@" ;;
*)
  sed -n 2,9p "$0"; exit 2 ;;
esac
