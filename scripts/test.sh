#!/usr/bin/env bash
# The test command: fetch the models (idempotent), then run every test, optimised.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_models.sh
cargo test --release --workspace
