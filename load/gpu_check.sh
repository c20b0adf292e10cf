#!/usr/bin/env bash
# The GPU proof of GPU slices, on a clean one-GPU machine (no network needed), in phases that
# each fit a 10-minute command; state is kept under $STATE between them.
#
# usage, from the repo root on the GPU machine:  load/gpu_check.sh PHASE [BUNDLE]
#   install BUNDLE  install vLLM 0.24.0 and the gateway's wheels into /root/site (BUNDLE: what
#                   ../shared/gpu/prepare.sh built, pieces already copied to /root/vw, /root/deps)
#   shares          build a 7B-shape random model on the GPU; start it alone at 0.3 of GPU 0
#                   (baseline), then the shared layout: chat-a 0.3 + chat-b 0.3 + tiny-embed 0.1,
#                   all spawned at once by the gateway (which starts them in turn); the gateway
#                   keeps running for the next phases
#   crash           kill -9 what `pkill -9 -f chat-a` hits (its helper and API server, not its
#                   engine core); chat-b must keep serving, chat-a come back with its share
#   bench           vLLM's benchmark client on chat-b, direct and through the gateway, three
#                   alternating rounds each at concurrency 1 and 64
#   sleep           two on-demand 7B-shape models swapping by vLLM's sleep mode on GPU 0
#                   (load/gpu_sleep.py): cold starts, swaps, memory released, a race, level 1
#   change          reload and restart without downtime (load/gpu_change.py): two always-on
#                   7B-shape models and a sleeping on-demand one on GPU 0; a reload restarts
#                   one, a gateway restart adopts all
#   prefix          `balance: prefix` against `least_outstanding`, two 7B-shape replicas on
#                   GPU 0, time to first token (load/gpu_prefix.py; BLOCKS caps each cache)
#   swaps           the swap scheduler against LRU: two sleeping 7B-shape models and a tiny one
#                   on GPU 0, one trace replayed, the policies interleaved (load/gpu_swaps.py)
#   workers         `workers` 1 and 4 against direct, the tiny chat model at 0.3 of GPU 0,
#                   vLLM's benchmark client over several processes (load/gpu_workers.py)
#   report          load/results/gpu-<date>.md (and a copy in $OUT when set)
set -euo pipefail
phase=$1
STATE=${STATE:-/root/gpu-check}
mkdir -p "$STATE/results"
export PYTHONPATH="/root/site:$PWD" HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
res=$STATE/results
log() { echo "[gpu-check $(date +%T)] $*"; }

config() {  # name, then models as "name:dir:share[:pooling]"
  local file=$STATE/$1.yaml; shift
  cat > "$file" <<YAML
host: 127.0.0.1
port: 8000
api_keys: [sk-gpu-check]
launcher: [python3, -m, vllm.entrypoints.openai.api_server]
log_dir: $STATE/logs
models:
YAML
  for m in "$@"; do
    IFS=: read -r name dir share kind <<< "$m"
    local extra="max-model-len: 4096"
    [ "$kind" = pooling ] && extra="runner: pooling"
    cat >> "$file" <<YAML
  - name: $name
    vllm:
      model: $dir
      gpus: [0]
      args: {gpu-memory-utilization: $share, enforce-eager: true, dtype: bfloat16, $extra}
YAML
  done
  echo "$file"
}

start_gateway() {  # config file; in its own session, so it outlives this command
  setsid python3 -m gateway serve --config "$1" > "$STATE/gateway.log" 2>&1 < /dev/null &
  echo $! > "$STATE/gateway.pid"
}

stop_gateway() {
  [ -f "$STATE/gateway.pid" ] || return 0
  kill "$(cat "$STATE/gateway.pid")" 2>/dev/null || true
  while kill -0 "$(cat "$STATE/gateway.pid")" 2>/dev/null; do sleep 1; done
  rm -f "$STATE/gateway.pid"
}

ready_or_die() {
  python3 load/gpu_steps.py wait-ready --timeout "$1" > "$res/$2-ready.json" || {
    tail -30 "$STATE/gateway.log"; tail -20 "$STATE"/logs/*.log; exit 1; }
}

case $phase in
install)
  (cd "$2" && bash serve.sh)
  [ ! -d "$2/models" ] || cp -r "$2/models" "$STATE/tiny"
  python3 -c "import vllm, fastapi, orjson, aiohttp; print('vllm', vllm.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$res/gpu.txt"
  ;;
shares)
  log "building the 7B-shape model"
  python3 load/gpu_models.py "$STATE/chat-7b" --tokenizer-from "$STATE/tiny/chat" | tee "$res/model.txt"
  python3 -m gateway plan --config "$(config plan "chat-a:$STATE/chat-7b:0.3")" > "$res/plan.txt" 2>&1 || true
  log "baseline: chat-a alone on GPU 0"
  start_gateway "$(config alone "chat-a:$STATE/chat-7b:0.3")"
  ready_or_die 400 alone
  python3 load/gpu_steps.py kv alone > "$res/kv-alone.json"
  stop_gateway
  log "shared: chat-a 0.3, chat-b 0.3, tiny-embed 0.1, spawned at once"
  start_gateway "$(config shared "chat-a:$STATE/chat-7b:0.3" "chat-b:$STATE/chat-7b:0.3" \
    "tiny-embed:$STATE/tiny/embed:0.1:pooling")"
  ready_or_die 500 shared
  python3 load/gpu_steps.py kv shared > "$res/kv-shared.json"
  grep -E "waiting|KV cache|ready after" "$STATE/gateway.log" > "$res/shared-gateway-lines.txt" || true
  log "shared layout ready; the gateway keeps running"
  ;;
crash)
  python3 load/gpu_steps.py crash chat-a chat-b > "$res/crash.json"
  grep -E "exited|waiting for pids|GPU memory|restarting|KV cache|ready after" \
    "$STATE/gateway.log" | tail -12 > "$res/crash-gateway-lines.txt" || true
  ;;
bench)
  python3 load/gpu_steps.py bench chat-b "$STATE/tiny/chat" "$STATE/bench" > "$res/bench.json"
  ;;
sleep)
  # Two on-demand 7B-shape models that cannot share GPU 0, `unload: sleep` at SLEEP_LEVEL (2);
  # level-1 rounds by admin sleeps too. Needs `install` first; builds the model if needed.
  [ -d "$STATE/chat-7b" ] || python3 load/gpu_models.py "$STATE/chat-7b" --tokenizer-from "$STATE/tiny/chat" | tee "$res/model.txt"
  cat > "$STATE/sleep.yaml" <<YAML
host: 127.0.0.1
port: 8000
api_keys: [{name: ops, key: sk-gpu-check, admin: true}]
launcher: [python3, -m, vllm.entrypoints.openai.api_server]
log_dir: $STATE/logs
models:
YAML
  for m in sleep-a sleep-b; do cat >> "$STATE/sleep.yaml" <<YAML
  - name: $m
    vllm:
      model: $STATE/chat-7b
      gpus: [0]
      args: {gpu-memory-utilization: 0.6, enforce-eager: true, dtype: bfloat16, max-model-len: 4096}
    on_demand: {idle_ttl: 3600, min_resident: 0, start_timeout: 600, unload: sleep, sleep_level: ${SLEEP_LEVEL:-2}}
YAML
  done
  python3 -m gateway plan --config "$STATE/sleep.yaml" > "$res/sleep-plan.txt" 2>&1 || true
  start_gateway "$STATE/sleep.yaml"
  python3 load/gpu_steps.py wait-up --timeout 60
  log "sleep: cold starts, ${ALTERNATIONS:-20} swaps, ${RACE:-60}s race, ${LEVEL1:-2} level-1 rounds"
  doc=${OUT:-$res}/sleep-level${SLEEP_LEVEL:-2}.json  # in $OUT as it grows: a cut run keeps it
  timeout "${SLEEP_BUDGET:-480}" python3 load/gpu_sleep.py run sleep-a sleep-b --save "$doc" \
    --alternations "${ALTERNATIONS:-20}" --race "${RACE:-60}" --level1-rounds "${LEVEL1:-2}" || true
  grep -E "asleep|awake|woke|loaded|wake failed|did not fall|start failed|restart" \
    "$STATE/gateway.log" > "$res/sleep-gateway-lines.txt" || true
  grep -ciE "cuda error|traceback|exception" "$STATE"/logs/sleep-*.log > "$res/sleep-backend-errors.txt" || true
  # How the backends listen (a unix socket in a 0700 directory by default with sleep mode):
  { ps -eo args | grep -E "api_server.*--(uds|port)" | grep -v grep | grep -oE -- "--(uds|port) [^ ]+" | sort -u
    python3 load/gpu_steps.py listeners
    ls -ld "$(dirname "$(ps -eo args | grep -oE -- "--uds [^ ]+" | head -1 | cut -d' ' -f2)")"
  } > "$res/sleep-listeners.txt" 2>&1 || true
  stop_gateway
  cp "$doc" "$res/" 2>/dev/null || true
  python3 load/gpu_sleep.py report "$doc" > "$res/sleep-level${SLEEP_LEVEL:-2}.md" || true
  [ -z "${OUT:-}" ] || { cp "$res"/sleep* "$OUT/"; tail -c 20000 "$STATE/gateway.log" > "$OUT/sleep-gateway-tail.log"; }
  ;;
change)
  [ -d "$STATE/chat-7b" ] || python3 load/gpu_models.py "$STATE/chat-7b" --tokenizer-from "$STATE/tiny/chat" | tee "$res/model.txt"
  doc=${OUT:-$res}/change.json
  timeout "${CHANGE_BUDGET:-560}" python3 load/gpu_change.py "$STATE/chat-7b" "$STATE" --save "$doc" || true
  grep -E "reload|adopt|restart|asleep|woke|ready after|KV cache" "$STATE/change-gateway.log" \
    | tail -60 > "$res/change-gateway-lines.txt" || true
  cp "$doc" "$res/" 2>/dev/null || true
  [ -z "${OUT:-}" ] || { cp "$res/change-gateway-lines.txt" "$OUT/"; tail -c 30000 "$STATE/change-gateway.log" > "$OUT/change-gateway-tail.log"; }
  ;;
prefix)
  [ -d "$STATE/chat-7b" ] || python3 load/gpu_models.py "$STATE/chat-7b" --tokenizer-from "$STATE/tiny/chat" | tee "$res/model.txt"
  doc=${OUT:-$res}/prefix.json
  timeout "${PREFIX_BUDGET:-540}" python3 load/gpu_prefix.py "$STATE/chat-7b" "$STATE/logs" \
    --save "$doc" --blocks "${BLOCKS:-2600}" --rounds "${ROUNDS:-3}" || true
  cp "$doc" "$res/" 2>/dev/null || true
  ;;
workers)
  doc=${OUT:-$res}/workers.json
  timeout "${WORKERS_BUDGET:-560}" python3 load/gpu_workers.py "$STATE/tiny/chat" "$STATE/workers" \
    --save "$doc" --concurrency "${CONCURRENCY:-256,64,512}" --rounds "${ROUNDS:-3}" \
    --waves "${WAVES:-4}" || true
  cp "$doc" "$res/" 2>/dev/null || true
  ;;
swaps)
  [ -d "$STATE/chat-7b" ] || python3 load/gpu_models.py "$STATE/chat-7b" --tokenizer-from "$STATE/tiny/chat" | tee "$res/model.txt"
  doc=${OUT:-$res}/swaps.json
  timeout "${SWAPS_BUDGET:-570}" python3 load/gpu_swaps.py "$STATE/chat-7b" "$STATE/tiny/chat" \
    "$STATE/swaps" --save "$doc" --rounds "${ROUNDS:-2}" --seconds "${SECONDS_PER_REPLAY:-60}" || true
  grep -E "asleep|awake|woke|swap|ready after|start failed" "$STATE/swaps/swaps-gateway.log" \
    | tail -80 > "$res/swaps-gateway-lines.txt" || true
  cp "$doc" "$res/" 2>/dev/null || true
  [ -z "${OUT:-}" ] || cp "$res/swaps-gateway-lines.txt" "$OUT/"
  ;;
report)
  mkdir -p load/results
  python3 load/gpu_report.py "$res" > "load/results/gpu-$(date +%F).md"
  [ -z "${OUT:-}" ] || { cp "load/results/gpu-$(date +%F).md" "$OUT/"; tar -czf "$OUT/gpu-state.tgz" -C "$STATE" results logs gateway.log; }
  ;;
*)
  echo "unknown phase: $phase" >&2; exit 2 ;;
esac
log "$phase done"
