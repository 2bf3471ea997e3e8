#!/usr/bin/env bash
# One call on a device machine: every GPU check and benchmark convoy has, then a short table.
# Build here first and carry the binaries (the device machine has CUDA, PyTorch and transformers
# but no Rust):
#   cargo build --release --bins      # target/release/convoy and convoy-bench
#   run(command="bash bench/gpu/check.sh", carry=["target/release/convoy", "target/release/convoy-bench"])
#
# What it does today (the CUDA runtime side of convoy is not built yet, see issue notes):
#   1. names the card and driver;
#   2. compiles every convoy CUDA kernel with the device machine's own NVRTC for the card's
#      architecture (convoy-bench gpu-kernels);
#   3. measures the side-by-side peer: transformers on the same card, Llama-3-8B shape, bf16,
#      GQA (8 KV heads) and MQA (1 KV head), decode at batch 1/32/128/256 with 1,024 tokens of
#      context, and prefill;
#   4. prints a table of what ran.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp}"
echo "== card"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || echo "no nvidia-smi"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')"
arch="compute_${cap:-90}"
echo "== kernels ($arch)"
lib="$(python3 -c 'import nvidia, os; print(next(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("cu13", "cuda_nvrtc") if os.path.isdir(os.path.join(p, d, "lib"))))' 2>/dev/null || true)"
for d in "$lib" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -n "$d" ] && [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
kernels="FAILED"
if ./target/release/convoy-bench gpu-kernels --arch "$arch" | tee "$out/kernels.txt"; then kernels="ok"; fi
echo "== transformers peer"
timeout 420 python3 bench/gpu/transformers_peer.py | tee "$out/transformers_peer.jsonl"
echo "== summary"
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
echo "convoy kernels compiled for $arch: $kernels"
python3 - "$out/transformers_peer.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print(f"{'engine':<14}{'model':<32}{'batch':>6}{'tok/s':>12}")
for r in rows:
    what = r.get("decode_tok_s", r.get("prefill_tok_s"))
    print(f"{r['engine']:<14}{r['model']:<32}{str(r.get('batch', 'prefill')):>6}{str(what):>12}")
print("convoy CUDA runtime: not built yet (no convoy GPU figures)")
PY
