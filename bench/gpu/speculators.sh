#!/usr/bin/env bash
# On the GPU machine, after every part of `bench/gpu/pack.sh MODEL DATA_DIR` has travelled
# (bench/gpu/unpack.sh): train SmolLM2's Medusa heads, MTP module and distilled 4-block draft on
# the GPU with the commands of the CPU-trained ones in BENCHMARKS.md, timed; the heads and modules
# land in $OUT for the acceptance runs on the CPU (`augur spec-bench`).
# Usage: bash bench/gpu/speculators.sh [medusa] [mtp] [draft]   (default: all three; Medusa and
# MTP need the data's cached hidden states)
set -uo pipefail
source bench/gpu/env.sh
bash bench/gpu/unpack.sh
[ -f /root/model.gguf ] && [ -d /root/data ] || { echo "the model and data have not all arrived"; exit 1; }
m=/root/model.gguf
d=/root/data
timed() { local t; t=$(date +%s%N); "$@"; echo "took $(( ($(date +%s%N) - t) / 1000000 )) ms: $*"; }
want=${*:-medusa mtp draft}
has() { [[ " $want " == *" $1 "* ]]; }
has medusa && timed .gpu/bin/augur train-medusa -m $m --data $d --device cuda --out "$out/m4b-gpu.safetensors" --heads 4 --layers 2 --epochs 8 --lr 2e-3 2>&1 | grep -v "^\s*$" | tail -12
has mtp && timed .gpu/bin/augur train-mtp -m $m --data $d --device cuda --out "$out/mtp1z-gpu.safetensors" --depth 1 --epochs 3 --lr 2e-3 2>&1 | grep -v "^\s*$" | tail -12
has draft && timed .gpu/bin/augur distill -m $m --data $d --device cuda --out /root/draft4-gpu.gguf --layers 4 --epochs 1 --lr 1e-3 2>&1 | grep -v "^\s*$" | tail -12
