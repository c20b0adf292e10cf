#!/usr/bin/env bash
# The CPU image from nothing, on a machine that can pull no image (Debian, root, podman from
# Debian's packages): a Debian base from Debian's packages (mmdebstrap, podman import), the CPU
# torch wheel pip resolves here copied into the build context, then deploy/Dockerfile on top.
#
#   scripts/image.sh build            # tools and base when missing, then the image (vllm-gateway:cpu)
#   scripts/image.sh run [ARGS...]    # the CPU demo on http://127.0.0.1:8000 (extra ARGS go to podman run)
#   scripts/image.sh podman ARGS...   # podman with the two options this VM needs
#
# Env: IMAGE (vllm-gateway:cpu), BASE_IMAGE (localhost/debian:bookworm), SUITE (bookworm).
# A key for `run`: VLLM_GATEWAY_API_KEYS (sk-demo when unset).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-vllm-gateway:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
SUITE=${SUITE:-bookworm}
TORCH_VERSION=2.13.0  # as scripts/setup-env.sh installs it
WHEELS=deploy/wheels  # in the build context (not in .gitignore's way: .dockerignore keeps it)

# crun refuses this VM's hybrid cgroups; runc with cgroupfs works on it and on plain hosts.
podman_() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }

pip_() {
  local py=python3
  [ -x .venv/bin/python ] && py=.venv/bin/python
  "$py" -m pip "$@"
}

install_tools() {
  local missing=()
  for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
      || { echo "image.sh: install ${missing[*]} (Debian: podman runc mmdebstrap)" >&2; exit 1; }
    echo "image.sh: installing podman, runc, mmdebstrap (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      podman runc mmdebstrap uidmap slirp4netns fuse-overlayfs >/dev/null
  fi
  # Podman's default ulimits exceed some VMs' hard limits ("setrlimit RLIMIT_NOFILE: Operation
  # not permitted"): an empty list keeps the caller's. crun refuses hybrid cgroups: runc with
  # cgroupfs works there and on plain hosts. In the config, so podman-compose gets them too.
  if [ "$(id -u)" = 0 ]; then
    conf_set containers default_ulimits '[]'
    conf_set engine runtime '"runc"'
    conf_set engine cgroup_manager '"cgroupfs"'
  fi
}

conf_set() {  # conf_set SECTION KEY VALUE: in containers.conf unless KEY is set there already
  local conf=/etc/containers/containers.conf
  mkdir -p /etc/containers
  grep -qs "^$2 *=" "$conf" && return
  if grep -qs "^\[$1\]" "$conf"; then
    sed -i "s/^\[$1\]/[$1]\n$2 = $3/" "$conf"
  else
    printf '[%s]\n%s = %s\n' "$1" "$2" "$3" >>"$conf"
  fi
}

build_base() (
  # A subshell, so the scratch folder's EXIT trap is its own: a RETURN trap set in a function
  # stays set and fires again when the caller returns, after `tmp` has gone.
  podman_ image exists "$BASE_IMAGE" && exit 0
  echo "image.sh: building $BASE_IMAGE from Debian's packages (mmdebstrap)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mmdebstrap --quiet --variant=minbase --include=ca-certificates "$SUITE" "$tmp/rootfs.tar"
  podman_ import -q --change 'CMD ["/bin/bash"]' "$tmp/rootfs.tar" "$BASE_IMAGE" >/dev/null
)

copy_torch_wheel() {
  # pip on this machine finds the CPU wheel on local disk (its config's find-links); a build
  # cannot see that disk, and PyPI's plain torch is the CUDA build. So the wheel pip resolves
  # here goes into the build context. Elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU index.
  mkdir -p "$WHEELS"
  compgen -G "$WHEELS/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null && return
  pip_ download -q --no-deps --only-binary=:all: --dest "$WHEELS" \
    "torch==$TORCH_VERSION+cpu"
}

build_image() {
  install_tools
  build_base
  copy_torch_wheel
  local args=() cert
  # pip here may trust a CA of its own (an HTTPS proxy): the build's pip gets the same bundle,
  # mounted for the build only (never in a layer).
  cert=${PIP_CERT:-$(pip_ config get global.cert 2>/dev/null || true)}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    args+=(--volume "$cert:/run/build-ca.pem:ro" --build-arg PIP_CERT=/run/build-ca.pem)
  fi
  for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do  # a mirror, PyTorch's CPU index
    [ -n "${!var:-}" ] && args+=(--build-arg "$var=${!var}")
  done
  local started=$SECONDS
  # docker format: OCI images have no HEALTHCHECK (podman drops it with a warning).
  podman_ build --network host --layers --format docker -f deploy/Dockerfile \
    --build-arg VARIANT=cpu --build-arg CPU_BASE="$BASE_IMAGE" ${args[@]+"${args[@]}"} \
    -t "$IMAGE" .
  echo "image.sh: built $IMAGE in $((SECONDS - started)) s"
}

run_demo() {
  # The config read-only; only loopback published; /dev/shm for vLLM (160 MiB a server, podman
  # gives 64 MiB). Ctrl-C stops it.
  export VLLM_GATEWAY_API_KEYS=${VLLM_GATEWAY_API_KEYS:-sk-demo}
  exec podman --runtime runc --cgroup-manager cgroupfs run --rm --name vllm-gateway-demo \
    -p 127.0.0.1:8000:8000 --shm-size 1g --stop-timeout 60 --env VLLM_GATEWAY_API_KEYS \
    -v "$PWD/config/cpu-demo.yaml:/etc/vllm-gateway/config.yaml:ro" "$@" "$IMAGE"
}

case "${1:-}" in
  base) install_tools; build_base ;;
  build) build_image ;;
  run) shift; run_demo "$@" ;;
  podman) shift; podman_ "$@" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
