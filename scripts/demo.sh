#!/usr/bin/env bash
# Set up on a fresh machine and run the main job: fetch the models, build, start the daemon
# on a Unix socket, hold a streamed multi-turn chat with it through the socket
# (examples/client.py), then stop it with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toolchain.sh
bash scripts/fetch_models.sh
cargo build --release --bin convoy --bin convoy-bench
sock="$PWD/target/demo.sock"
./target/release/convoy serve --socket "$sock" &
daemon=$!
trap 'kill -TERM "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  [ -S "$sock" ] && break
  sleep 0.1
done
python3 examples/client.py --socket "$sock" \
  "Hello! Who are you?" "What is the tallest mountain in the world?" "Thank you! Say goodbye in French."
# Stop the daemon first, so its last words come before the suggestions.
kill -TERM "$daemon" 2>/dev/null || true
wait "$daemon" || true
trap - EXIT
cat <<'NEXT'

Next, try:
  ./target/release/convoy chat                      # interactive; each turn shows its cached tokens
  ./target/release/convoy serve --http 127.0.0.1:8000   # the OpenAI-compatible face (docs/http.md)
  ./target/release/convoy serve --device sim        # a simulated H100 (docs/simulation.md)
  ./target/release/convoy plan --help               # how many GPUs for a workload (docs/planning.md)
  ./target/release/convoy-bench --help              # benchmarks (docs/benchmarks.md)
NEXT
