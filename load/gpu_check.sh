#!/usr/bin/env bash
# The whole GPU check, again, on a clean one-GPU machine (no network needed): the gateway spawns
# the tiny chat, embedding and reranking models on GPU 0 in memory slices; chat, a stream,
# embeddings and rerank go through it; one backend is killed and comes back; vLLM's own benchmark
# client measures direct vs. through the gateway; load/results/gpu-<date>.md gets the numbers.
#
# usage, from the repo root on the GPU machine:  load/gpu_check.sh BUNDLE_DIR [OUT_DIR]
#   BUNDLE_DIR: what ../shared/gpu/prepare.sh built (vLLM 0.24.0 wheel pieces p0..p4 as
#   /root/vw/part*, dA, dB with the gateway's missing wheels too, models/); vLLM installs into
#   /root/site. With vLLM already installed, set VLLM_INSTALLED=1.
set -euo pipefail
bundle=$1 out=${2:-load/results}
mkdir -p "$out"
work=$(mktemp -d)
res="$work/results"  # intermediate files; only the report (and logs on failure) land in $out
mkdir -p "$res"
export PYTHONPATH="/root/site:$PWD" HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
log() { echo "[gpu-check $(date +%T)] $*"; }

if [ "${VLLM_INSTALLED:-0}" != 1 ]; then
  log "installing vLLM 0.24.0 and the gateway's wheels into /root/site"
  (cd "$bundle" && bash serve.sh)
fi
python3 -c "import vllm, fastapi, orjson, aiohttp; print('vllm', vllm.__version__)"

models=$(cd "$bundle/models" && pwd)
cat > "$work/gpu.yaml" <<YAML
host: 127.0.0.1
port: 8000
api_keys: [sk-gpu-check]
launcher: [python3, -m, vllm.entrypoints.openai.api_server]
log_dir: $work/logs
models:
  - name: tiny-chat
    aliases: [chat]
    vllm:
      model: $models/chat
      gpus: [0]
      args: {gpu-memory-utilization: 0.3, enforce-eager: true, dtype: bfloat16, max-model-len: 1024}
  - name: tiny-embed
    vllm:
      model: $models/embed
      gpus: [0]
      args: {gpu-memory-utilization: 0.1, enforce-eager: true, dtype: bfloat16, runner: pooling}
  - name: tiny-rerank
    vllm:
      model: $models/rerank
      gpus: [0]
      args: {gpu-memory-utilization: 0.1, enforce-eager: true, dtype: bfloat16, runner: pooling}
YAML
log "starting the gateway; it spawns three vLLM servers on GPU 0"
python3 -m gateway serve --config "$work/gpu.yaml" > "$work/gateway.log" 2>&1 &
gateway=$!
finish() {
  code=$?
  kill $gateway 2>/dev/null; wait $gateway 2>/dev/null || true
  [ "$code" = 0 ] || tar -czf "$out/gpu-logs.tgz" -C "$work" . 2>/dev/null || true
}
trap finish EXIT
python3 load/gpu_report.py wait-ready --timeout 420 || { tail -40 "$work/gateway.log"; tail -30 "$work"/logs/*.log; exit 1; }
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$res/gpu-nvidia-smi.csv"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >> "$res/gpu-nvidia-smi.csv"
python3 load/gpu_report.py check > "$res/gpu-check.json"
cat "$res/gpu-check.json"

# vLLM's own benchmark client, direct and through the gateway, in the same run.
read -r direct_port direct_key < <(python3 load/gpu_report.py direct tiny-chat)
bench() {  # label base_url key concurrency prompts
  OPENAI_API_KEY=$3 python3 -m vllm.entrypoints.cli.main bench serve --backend openai \
    --base-url "$2" --endpoint /v1/completions --model tiny-chat --tokenizer "$models/chat" \
    --dataset-name random --random-input-len 128 --random-output-len 128 --ignore-eos \
    --num-prompts "$5" --max-concurrency "$4" --save-result --result-dir "$res" \
    --result-filename "gpu-bench-$1-c$4.json" > "$work/bench-$1-c$4.log" 2>&1 \
    || { tail -20 "$work/bench-$1-c$4.log"; return 1; }
  log "bench $1 c=$4 done"
}
# vLLM's client sends one test prompt first, which warms each path.
for c in 1 64; do
  n=$([ "$c" = 1 ] && echo 40 || echo 640)
  bench direct "http://127.0.0.1:$direct_port" "$direct_key" "$c" "$n"
  bench gateway "http://127.0.0.1:8000" sk-gpu-check "$c" "$n"
done

log "killing the embedding server with SIGKILL; the others must keep serving"
python3 load/gpu_report.py kill-one tiny-embed > "$res/gpu-kill.json"
python3 load/gpu_report.py report "$res" > "$out/gpu-$(date +%F).md"
cat "$out/gpu-$(date +%F).md"
