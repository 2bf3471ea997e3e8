#!/usr/bin/env bash
# One call on a device machine: every GPU check and benchmark convoy has, then a short table.
# It never stops at the first failure: each step's verdict goes to the summary.
# Build here first and carry the stripped binaries (the device machine has CUDA, PyTorch and
# transformers but no Rust; the tree that travels is capped at 64 MiB):
#   cargo build --release --bins && strip target/release/convoy target/release/convoy-bench
#   run(command="bash bench/gpu/check.sh", carry=["target/release/convoy", "target/release/convoy-bench", "models"])
#
# Steps:
#   1. the card and driver;
#   2. every kernel compiled by the machine's NVRTC for the card (convoy-bench gpu-kernels);
#   3. every operation on the card against the emulated device, SmolLM2, Llama-3-8B GQA and
#      MQA shapes (convoy-bench gpu-ops: NMSE per operation);
#   4. SmolLM2 on the card against the CPU: logits, greedy tokens, a 3-turn chat with every
#      cache-hit prefill recomputed, decode steps as CUDA graphs against eager ones
#      (convoy-bench gpu-model);
#   5. `convoy serve --device cuda --gpu-memory-utilization 0.5`: a chat over the socket,
#      later turns from the cache;
#   6. decode at batch 1/32/128/256 with 1,024 tokens of context and prefill, dummy
#      Llama-3-8B bf16, GQA (8 KV heads) and MQA (1) (convoy-bench gpu-decode), and the
#      card's device-to-device copy bandwidth for the batch-1 bound;
#   7. the transformers peer, same shapes, same card;
#   8. the summary table.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp}"
bin=./target/release
declare -A verdict
step() { # name, command...
  local name="$1"; shift
  echo "== $name"
  if "$@"; then verdict[$name]="ok"; else verdict[$name]="FAILED ($?)"; fi
}
echo "== card"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || echo "no nvidia-smi"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')"
lib="$(python3 -c 'import nvidia, os; print(next(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("cu13", "cuda_nvrtc") if os.path.isdir(os.path.join(p, d, "lib"))))' 2>/dev/null || true)"
for d in "$lib" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -n "$d" ] && [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
step kernels "$bin/convoy-bench" gpu-kernels --arch "compute_${cap:-90}"
step ops bash -c "$bin/convoy-bench gpu-ops --device cuda | tee $out/gpu-ops.txt"
step model bash -c "$bin/convoy-bench gpu-model --on cuda | tee $out/gpu-model.txt"
serve_chat() {
  local sock="$out/convoy-check.sock"
  rm -f "$sock"
  "$bin/convoy" serve --device cuda --socket "$sock" --gpu-memory-utilization 0.5 --host-cache-memory 2GiB &
  local pid=$!
  for _ in $(seq 1 120); do [ -S "$sock" ] && break; sleep 1; done
  python3 - "$sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
msgs = [{"role": "system", "content": "You are a helpful pirate."}]
hits = []
for turn in ["Hello!", "Where is the treasure?", "How far is it?"]:
    msgs.append({"role": "user", "content": turn})
    f.write(json.dumps({"op": "generate", "id": "t", "messages": msgs, "max_tokens": 24, "temperature": 0}) + "\n"); f.flush()
    text = ""
    while True:
        ev = json.loads(f.readline())
        if ev.get("event") == "token": text += ev.get("text", "")
        elif ev.get("event") == "done": hits.append((ev["usage"]["cached_tokens"], ev["usage"]["prompt_tokens"])); break
        elif ev.get("event") == "error": print("error", ev); sys.exit(1)
    msgs.append({"role": "assistant", "content": text})
print("turns (cached, prompt):", hits)
sys.exit(0 if all(c > p // 2 for c, p in hits[1:]) else 1)
PY
  local rc=$?
  kill -TERM "$pid"; wait "$pid"
  return $rc
}
step serve serve_chat
step decode bash -c "timeout 540 $bin/convoy-bench gpu-decode --device cuda | tee $out/gpu-decode.txt"
echo "== copy bandwidth"
python3 - <<'PY' | tee "$out/bandwidth.txt"
import torch
n = 4 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): b.copy_(a)
e.record(); torch.cuda.synchronize()
print(f"device-to-device copy: {2 * n * 10 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s (read + write)")
PY
step peer bash -c "timeout 420 python3 bench/gpu/transformers_peer.py | tee $out/transformers_peer.jsonl"
echo "== summary"
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
for k in kernels ops model serve decode peer; do printf '%-8s %s\n' "$k" "${verdict[$k]:-not run}"; done
cat "$out/gpu-decode.txt" 2>/dev/null
python3 - "$out/transformers_peer.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
except OSError:
    rows = []
print(f"{'engine':<14}{'model':<32}{'batch':>6}{'tok/s':>12}")
for r in rows:
    what = r.get("decode_tok_s", r.get("prefill_tok_s"))
    print(f"{r['engine']:<14}{r['model']:<32}{str(r.get('batch', 'prefill')):>6}{str(what):>12}")
PY
