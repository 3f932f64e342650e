#!/usr/bin/env bash
# Build llama.cpp's llama-bench from the PyPI source package of llama-cpp-python (its vendored
# llama.cpp), with cmake and ninja from PyPI. About 12 CPU-minutes; the result is cached.
# Usage: bench/build-llama-cpp.sh [CACHE_DIR]   -> prints the path of llama-bench
set -euo pipefail
VERSION=0.3.36
CACHE=${1:-${AUGUR_BENCH_CACHE:-$(dirname "$0")/.cache}}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
BIN="$CACHE/llama.cpp-$VERSION/build/bin/llama-bench"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
cd "$CACHE"
python3 -m pip install --quiet cmake ninja >&2
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  # --no-binary for this package only: its build backend (cmake, scikit-build-core) may come as wheels.
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d . >&2
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
rm -rf "llama.cpp-$VERSION"
cp -r "llama_cpp_python-$VERSION/vendor/llama.cpp" "llama.cpp-$VERSION"
cd "llama.cpp-$VERSION"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build build --target llama-bench -j 2 >&2
echo "$BIN"
