#!/usr/bin/env bash
# Build the CUDA binaries here (no CUDA needed to build) and stage what the GPU machine needs in
# .gpu/ (git-ignored), within the device tool's 64 MiB per call: the stripped binaries, the NVRTC
# cache for sm_90 when NVRTC 13.0 is at $NVRTC_LIB (the device's driver loads no newer PTX), so the
# machine does not spend minutes compiling, and a model (and a `distill-data` directory) in parts
# .gpu/part1, part2, ... of 60 MB: more than one call may carry, so each part travels in a call of
# its own and waits in /root on the warm machine (bench/gpu/unpack.sh), and the last one assembles
# /root/model.gguf (and /root/data).
# Usage: bench/gpu/pack.sh [MODEL.gguf [DATA_DIR]]
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-}
data=${2:-}
cargo build -q --release -p augur-cli --features cuda
tests=$(cargo test -q --release -p augur-cuda -p augur-models -p augur-decode -p augur-cli -p augur-nn -p augur-distill -p augur-dist --features augur-models/cuda,augur-decode/cuda,augur-cli/cuda,augur-dist/cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("executable") and m["target"]["name"] in ("augur_cuda","cuda","reference","ddp_nccl","torch_golden","medusa_tiny","mtp_tiny","draft_tiny","nccl_device","device"): print(m["executable"])')
rm -rf .gpu && mkdir -p .gpu/bin
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
  stage=$(mktemp -d)
  ln -s "$(realpath "$model")" "$stage/model.gguf"
  [ -z "$data" ] || ln -s "$(realpath "$data")" "$stage/data"
  tar -chf - -C "$stage" . | split -b 60M -d - .gpu/blob.
  rm -rf "$stage"
  n=$(ls .gpu/blob.* | wc -l)
  i=0
  for b in .gpu/blob.*; do
    i=$((i + 1))
    mkdir -p ".gpu/part$i"
    mv "$b" ".gpu/part$i/"
    echo "$n" > ".gpu/part$i/parts"
  done
fi
du -sh .gpu/*
