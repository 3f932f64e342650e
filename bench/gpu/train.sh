#!/usr/bin/env bash
# On the GPU machine, after bench/gpu/pack.sh here: the training backend's tests (gradient checks
# and ops against the host), the tiny-GPT golden steps on the GPU, then `augur bench train`
# beside PyTorch eager and torch.compile on the same ~100M GPT (bench/gpu/train_peer.py).
set -uo pipefail
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
echo "== CUDA conformance and the training backend vs host"; .gpu/bin/test-augur_cuda --test-threads 1 2>&1 | tail -15
echo "== golden steps on the GPU"; .gpu/bin/test-torch_golden steps_on_the_gpu --nocapture 2>&1 | tail -5
echo "== GPT training: augur, PyTorch eager, torch.compile"
python3 bench/gpu/train_peer.py "$@" 2>&1 | tee -a "$out/train_gpu.jsonl"
