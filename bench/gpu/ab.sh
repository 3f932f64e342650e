#!/usr/bin/env bash
# On the GPU machine: decode tok/s of the CUDA step with and without compile-time knobs
# (AUGUR_CUDA_DEFINES, e.g. "-DDK_PREFETCH=0"), alternating in one call,
# on the synthetic default-shape model (only .gpu/bin/augur needs to travel), then the tiny-model
# CUDA tests built with the knobs when .gpu/bin/test-cuda is there.
# Usage: bench/gpu/ab.sh DEFINES [ROUNDS] [DEPTHS]   (defaults: 3 rounds, depths "0 3968")
set -uo pipefail
source bench/gpu/env.sh
defs=${1:?usage: bench/gpu/ab.sh DEFINES [ROUNDS] [DEPTHS], e.g. "-DDK_PREFETCH=0"}
rounds=${2:-3}
depths=${3:-0 3968}
for d in $depths; do
  for i in $(seq "$rounds"); do
    for v in base knobs; do
      if [ "$v" = knobs ]; then export AUGUR_CUDA_DEFINES="$defs"; else unset AUGUR_CUDA_DEFINES; fi
      .gpu/bin/augur bench --device cuda --synthetic -p 128 -d "$d" -g 256 --runs 3 2>/dev/null | tail -1 |
        python3 -c 'import json, sys; j = json.loads(sys.stdin.read()); print(sys.argv[1], j["decode_tok_per_s"], j.get("decode_persistent_tok_per_s"), j.get("decode_graph_tok_per_s"))' "depth $d round $i $v:" |
        tee -a "$out/ab.txt"
    done
  done
done
unset AUGUR_CUDA_DEFINES
if [ -x .gpu/bin/test-cuda ]; then
  echo "== tiny models vs CPU with $defs"
  AUGUR_CUDA_DEFINES="$defs" .gpu/bin/test-cuda --test-threads 1 2>&1 | tail -4
fi
