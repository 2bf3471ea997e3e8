#!/usr/bin/env bash
# convoy and llama.cpp's llama-server side by side on the same chat workload, through the same
# load generator (`convoy-bench run --target openai`), same GGUF, same threads, same parallel
# slots, one server at a time on an otherwise idle machine. Prints both tables and writes
# JSON reports into $OUT (default bench/peer-out, git-ignored).
#
#   bash bench/peer_chat.sh                         # SmolLM2 Q4_1, rates from $RATES
#   RATES=0.02,0.05 DURATION=120 bash bench/peer_chat.sh
#   PRECISION=fast bash bench/peer_chat.sh          # convoy in its fast precision
#   KV_CACHE_DTYPE=f16 bash bench/peer_chat.sh      # convoy with an f16 KV cache
#   CONCURRENCY=16 bash bench/peer_chat.sh          # closed loop: 16 conversations alive at
#                                                   # once, each ended one starting the next
#
# Needs: target/release/{convoy,convoy-bench} (cargo build --release) and llama-server
# (bench/build_llama_cpp.sh builds it from the llama-cpp-python sdist).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
model="${MODEL:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
workload="${WORKLOAD:-bench/workloads/chat.toml}"
rates="${RATES:-0.02,0.04,0.08}"
duration="${DURATION:-90}"
threads="${THREADS:-2}"
slots="${SLOTS:-16}"
ctx_per_slot="${CTX_PER_SLOT:-4096}"
out="${OUT:-bench/peer-out}"
precision="${PRECISION:-exact}"   # convoy's --precision: exact or fast
kv_dtype="${KV_CACHE_DTYPE:-f32}" # convoy's --kv-cache-dtype: f32, f16 or fp8_e4m3
bin="$(bash bench/build_llama_cpp.sh)"
mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 600); do
    curl -sf "$1/v1/models" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not come up" >&2
  return 1
}
# Open loop at each of $rates, or closed loop at $CONCURRENCY conversations.
if [ -n "${CONCURRENCY:-}" ]; then
  load=(--arrival closed --concurrency "$CONCURRENCY")
else
  load=(--sweep "$rates")
fi
run_bench() { # name url
  ./target/release/convoy-bench run --target openai --url "$2" --workload "$workload" \
    "${load[@]}" --duration-s "$duration" --no-progress \
    --slo-ttft-ms "${SLO_TTFT_MS:-5000}" --slo-tpot-ms "${SLO_TPOT_MS:-200}" \
    --report "$out/$1.json" --plot-dir "$out/$1-plots"
}
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
if [ -n "${CONCURRENCY:-}" ]; then shape="closed loop at $CONCURRENCY conversations"; else shape="rates $rates conv/s"; fi
echo "machine: $cpu, $(nproc) CPUs; model $model; $threads threads; $slots slots; $shape; $duration s each"

port=$(free_port)
./target/release/convoy serve --model "$model" --threads "$threads" --max-running "$slots" \
  --precision "$precision" --kv-cache-dtype "$kv_dtype" --socket "$out/convoy.sock" \
  --http "127.0.0.1:$port" 2>"$out/convoy.log" &
pids+=($!)
wait_http "http://127.0.0.1:$port"
echo; echo "== convoy (convoy serve --threads $threads --max-running $slots --precision $precision --kv-cache-dtype $kv_dtype)"
run_bench convoy "http://127.0.0.1:$port"
cleanup; pids=()

port=$(free_port)
"$bin/llama-server" -m "$model" -t "$threads" -tb "$threads" -np "$slots" -c $((slots * ctx_per_slot)) \
  --cache-reuse 256 --host 127.0.0.1 --port "$port" >"$out/llama-server.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$port"
echo; echo "== llama-server (-t $threads -np $slots -c $((slots * ctx_per_slot)) --cache-reuse 256)"
run_bench llama-server "http://127.0.0.1:$port"
