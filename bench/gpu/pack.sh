#!/usr/bin/env bash
# Build the CUDA binaries here (no CUDA needed to build) and stage what the GPU machine needs in
# .gpu/ (git-ignored), within the device tool's 64 MiB per call: the stripped binaries, and the
# default model in two parts (it is larger than one call may carry; part 1 travels first and waits
# in /root on the warm machine), and the NVRTC cache for sm_90 when NVRTC 13.0 is at $NVRTC_LIB
# (the device's driver loads no newer PTX), so the machine does not spend minutes compiling.
# Usage: bench/gpu/pack.sh [MODEL.gguf]
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-}
cargo build -q --release -p augur-cli --features cuda
tests=$(cargo test -q --release -p augur-cuda -p augur-models -p augur-cli -p augur-nn -p augur-distill --features augur-models/cuda,augur-cli/cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("executable") and m["target"]["name"] in ("augur_cuda","cuda","reference","ddp_nccl","torch_golden","medusa_tiny","mtp_tiny"): print(m["executable"])')
rm -rf .gpu && mkdir -p .gpu/bin .gpu/part1 .gpu/part2
if [ -n "${NVRTC_LIB:-}" ]; then
  cargo build -q --release -p augur-cuda --example warm_cache
  AUGUR_CACHE=.gpu/cache LD_LIBRARY_PATH=$NVRTC_LIB target/release/examples/warm_cache 9 0
fi
strip -o .gpu/bin/augur target/release/augur
for t in $tests; do
  n=$(basename "$t" | sed 's/-[0-9a-f]*$//')
  strip -o ".gpu/bin/test-$n" "$t"
done
if [ -n "$model" ]; then
  split -b 60M -d "$model" .gpu/model.
  mv .gpu/model.00 .gpu/part1/model.00
  mv .gpu/model.01 .gpu/part2/model.01
fi
du -sh .gpu/*
