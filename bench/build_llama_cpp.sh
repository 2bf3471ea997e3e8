#!/usr/bin/env bash
# Build llama.cpp's llama-bench from the llama-cpp-python sdist on PyPI (the peer for the CPU
# benchmarks), into bench/llama.cpp (git-ignored). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/llama.cpp"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
if [ -x "$dest/build/bin/llama-bench" ]; then
  echo "$dest/build/bin/llama-bench"
  exit 0
fi
command -v cmake >/dev/null || python3 -m pip install --quiet cmake
tmp="$(mktemp -d)"
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$tmp"
tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
rm -rf "$dest"
mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$dest"
rm -rf "$tmp"
cmake -S "$dest" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >"$dest.build.log" 2>&1
cmake --build "$dest/build" --target llama-bench -j "$(nproc)" >>"$dest.build.log" 2>&1
echo "$dest/build/bin/llama-bench"
