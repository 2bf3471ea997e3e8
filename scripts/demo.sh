#!/usr/bin/env bash
# Set up on a fresh machine and run the main job: fetch the models, build, and generate a
# streamed chat reply with SmolLM2 on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_models.sh
cargo build --release --bin convoy
printf '[{"role":"user","content":"What is the tallest mountain in the world?"}]' > target/demo-chat.json
./target/release/convoy generate --chat target/demo-chat.json --max-tokens 64
