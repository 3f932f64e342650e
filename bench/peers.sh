#!/usr/bin/env bash
# augur vs llama.cpp on the default model, side by side. See bench/peers.py for the method.
# Usage: bench/peers.sh [--rounds 5] [--threads 2]
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BENCH=$(bench/build-llama-cpp.sh)
cargo build --release --quiet -p augur-cli
MODEL=$(target/release/augur fetch)
exec python3 bench/peers.py --llama-bench "$LLAMA_BENCH" --model "$MODEL" "$@"
