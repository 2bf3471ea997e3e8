#!/usr/bin/env bash
# The test command (CI runs exactly this, through .ci/run):
#  1. style and lints: cargo fmt --check, cargo clippy --all-targets -D warnings;
#  2. the fuzz target still compiles (its crate is outside the workspace);
#  3. fetch the models (idempotent) and NVRTC (CPU-only, from the nvidia-cuda-nvrtc wheel,
#     pinned to CUDA 13.0 so the PTX also loads on a CUDA 13.0 driver) so every CUDA kernel is
#     compiled in the tests, and ptxas (nvidia-cuda-nvcc) for their resource budgets;
#     and the official `openai` and `prometheus-client` Python packages (the HTTP tests use them);
#     and Debian's HAProxy (the fleet test, engine/server/tests/fleet_haproxy.rs), its config checked;
#  4. every test of the workspace, optimised.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toolchain.sh
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
# The fuzz target, type-checked against today's API (its crate is its own workspace, whose
# feature set differs from ours, so a full release build would compile every dependency a
# second time: ~8 minutes on a 2-core machine; `cargo fuzz run parse_line` builds it for real).
CARGO_TARGET_DIR=target cargo check --release --manifest-path fuzz/Cargo.toml
bash scripts/fetch_models.sh
python3 -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==13.0.88" 2>&1 | grep -v "running pip as the 'root' user" || true
nvrtc_lib="$(python3 -c 'import nvidia, os; print(next(os.path.join(p, "cu13", "lib") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13", "lib"))))')"
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CONVOY_REQUIRE_NVRTC=1
# ptxas (nvidia-cuda-nvcc, CPU-only) for the kernels' register, spill and shared-memory budgets.
python3 -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvcc==13.0.88" 2>&1 | grep -v "running pip as the 'root' user" || true
CONVOY_PTXAS="$(dirname "$nvrtc_lib")/bin/ptxas"
export CONVOY_PTXAS CONVOY_REQUIRE_PTXAS=1
# The official OpenAI client and Prometheus' parser, for the HTTP face's Python test.
python3 -m pip install --quiet --disable-pip-version-check "openai==3.57.0" "prometheus-client==0.26.0" 2>&1 | grep -v "running pip as the 'root' user" || true
export CONVOY_REQUIRE_OPENAI=1
# The fleet recipe (docs/deploy.md): HAProxy for the fleet test, its config checked in both modes.
if ! command -v haproxy >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq haproxy >/dev/null
fi
CONVOY_REPLICA_1=127.0.0.1:8001 haproxy -c -q -f deploy/haproxy.cfg
CONVOY_REPLICA_1=127.0.0.1:8001 CONVOY_BALANCE=roundrobin haproxy -c -q -f deploy/haproxy.cfg
bash -n scripts/fleet.sh
export CONVOY_REQUIRE_HAPROXY=1
cargo test --release --workspace
