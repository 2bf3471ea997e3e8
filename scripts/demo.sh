#!/usr/bin/env bash
# Set up on a fresh machine and run the main job: fetch the models, build, start the daemon
# on a Unix socket, hold a streamed multi-turn chat with it through the socket
# (examples/client.py), then stop it with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_models.sh
cargo build --release --bin convoy
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
