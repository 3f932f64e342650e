#!/usr/bin/env bash
# On the GPU machine, after every part of `bench/gpu/pack.sh MODEL` has travelled
# (bench/gpu/unpack.sh): what a forward pass over b tokens costs there in decode steps (the cost
# speculation has to beat), then `augur spec-bench` on the task set, plain decoding against
# prompt lookup, every forward pass on the device.
# Usage: bash bench/gpu/spec.sh [extra spec-bench options]
set -uo pipefail
source bench/gpu/env.sh
bash bench/gpu/unpack.sh
[ -f /root/model.gguf ] || { echo "the model has not all arrived"; exit 1; }
m=/root/model.gguf
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== augur run, the argmax on the device, then with every step's logits on the host"
for flags in "" "--json --top-logits 1"; do
  .gpu/bin/augur run --device cuda -m $m --chat "Write a short story about a lighthouse keeper." --max-tokens 256 --stats $flags 2>&1 >/dev/null | tail -3
done
echo "== forward passes over b tokens at depth 256"
.gpu/bin/augur bench --device cuda -m $m -p 1 -g 128 -d 256 --batches 1,2,4,8,16 --runs 5 | tee -a "$out/batches.jsonl"
echo "== spec-bench"
.gpu/bin/augur spec-bench --device cuda -m $m -n 128 "$@" 2>&1 | grep -v "^task " | tee -a "$out/spec.txt"
