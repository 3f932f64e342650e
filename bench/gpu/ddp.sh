#!/usr/bin/env bash
# On nvidia-h200-x2, after bench/gpu/pack.sh here: data-parallel GPU training through NCCL.
# The equivalence tests (Ddp's device path against plain backward; `augur train --ddp nccl` on 1
# and 2 GPUs against one process with the whole batch), then `augur bench train` on the ~100M
# GPT of bench/gpu/gpt-100m.json, batch 8 x 1024 per GPU, bf16 autocast: one GPU without DDP,
# one NCCL rank, two NCCL ranks, alternating for --rounds rounds. Results also go to $OUT.
# Usage: bash bench/gpu/ddp.sh [ROUNDS] [STEPS]
set -uo pipefail
rounds=${1:-3}
steps=${2:-10}
source bench/gpu/env.sh
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
nvidia-smi topo -m | head -4
echo "== Ddp's device path vs plain backward (one rank)"; .gpu/bin/test-nccl_device --nocapture 2>&1 | grep -E "skipped|test result|panicked|assert" | head
echo "== augur train --ddp nccl vs one process"; AUGUR_BIN=$PWD/.gpu/bin/augur .gpu/bin/test-ddp_nccl --test-threads 1 --nocapture 2>&1 | grep -E "rank\(s\) on|skipped|test result|panicked" | head
bench() { .gpu/bin/augur bench train --config bench/gpu/gpt-100m.json --batch 8 --seq-len 1024 --precision bf16 --device cuda --steps "$steps" "$@"; }
gpus=$(nvidia-smi -L | grep -c '^GPU ')
for r in $(seq "$rounds"); do
  echo "== round $r"
  bench | tee -a "$out/ddp.jsonl"
  bench --ddp nccl --nproc 1 | tee -a "$out/ddp.jsonl"
  [ "$gpus" -lt 2 ] || bench --ddp nccl --nproc 2 | tee -a "$out/ddp.jsonl"
done
