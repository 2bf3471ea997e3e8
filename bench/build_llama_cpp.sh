#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-server from the llama-cpp-python sdist on PyPI (the
# peer for the CPU benchmarks and for `convoy-bench run --target openai`), into
# bench/llama.cpp (git-ignored). Idempotent; prints the bin directory.
#
# The instruction set is chosen explicitly from /proc/cpuinfo instead of GGML_NATIVE=ON:
# -march=native can emit AMX instructions that a virtual machine faults on when the
# hypervisor has not granted them. AVX2/FMA/F16C always when present; AVX-512 (F, BW, DQ, VL,
# VNNI, BF16) when present; AMX never (set LLAMA_AMX=ON to allow it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/llama.cpp"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
bin="$dest/build/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-server" ]; then
  echo "$bin"
  exit 0
fi
command -v cmake >/dev/null || python3 -m pip install --quiet cmake
if [ ! -f "$dest/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$dest"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$dest"
  rm -rf "$tmp"
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
isa=(-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)
  -DGGML_F16C=$(has f16c) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)
  -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)
  -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AMX_TILE="${LLAMA_AMX:-OFF}"
  -DGGML_AMX_INT8="${LLAMA_AMX:-OFF}" -DGGML_AMX_BF16="${LLAMA_AMX:-OFF}")
echo "llama.cpp ISA: ${isa[*]}" >"$dest.build.log"
cmake -S "$dest" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >>"$dest.build.log" 2>&1
cmake --build "$dest/build" --target llama-bench llama-server -j "$(nproc)" >>"$dest.build.log" 2>&1
echo "$bin"
