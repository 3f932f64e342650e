#!/usr/bin/env bash
# On the GPU machine, after bench/gpu/pack.sh here: the CUDA conformance suite, the tiny-model
# CUDA tests, the reference test on the device, then augur's decode speed beside HF transformers'
# (bench/gpu/hf_peer.py) and FlashAttention's TFLOP/s beside PyTorch SDPA's
# (bench/gpu/flash_peer.py). Results also go to $OUT (or bench/gpu/out). Model: /root/model.gguf,
# assembled from the parts pack.sh made (bench/gpu/unpack.sh).
set -uo pipefail
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
model=/root/model.gguf
bash bench/gpu/unpack.sh
[ -f $model ] || echo "NO MODEL: its parts did not all wait on this machine; model tests and bench skipped"
echo "== conformance (kernels vs CPU)"; .gpu/bin/test-augur_cuda --test-threads 1 2>&1 | tail -15
echo "== tiny models vs CPU"; .gpu/bin/test-cuda --test-threads 1 2>&1 | tail -15
if [ -f $model ]; then
  echo "== reference on cuda"
  AUGUR_MODEL=$model .gpu/bin/test-reference matches_hf_transformers_on_cuda --nocapture 2>&1 | tail -12
  echo "== augur bench"
  for d in 0 0 3968; do
    .gpu/bin/augur bench --device cuda -m $model -p 128 -d $d -g 256 --runs 5 | tee -a "$out/augur.jsonl"
  done
  echo "== run"
  .gpu/bin/augur run --device cuda -m $model --chat "Write one sentence about the sea." --max-tokens 40 2>&1 | tail -5
fi
echo "== HF peer"
python3 bench/gpu/hf_peer.py 2>/dev/null | tee -a "$out/hf.jsonl"
echo "== FlashAttention: augur, then PyTorch SDPA (flash backend), same shapes"
.gpu/bin/augur bench flash --runs 5 | tee -a "$out/flash.jsonl"
python3 bench/gpu/flash_peer.py 2>/dev/null | tee -a "$out/flash_torch.jsonl"
# On a machine with two or more GPUs: NCCL equivalence and all-reduce bus bandwidth.
if [ "$(nvidia-smi -L | grep -c '^GPU ')" -ge 2 ]; then
  export NCCL_NVLS_ENABLE=0
  echo "== NCCL ranks vs one process"; AUGUR_BIN=$PWD/.gpu/bin/augur .gpu/bin/test-ddp_nccl --test-threads 1 2>&1 | tail -3
  echo "== all-reduce: augur, then torch.distributed"
  .gpu/bin/augur bench allreduce --backend nccl --nproc 2 --sweep 1,16,256,1024 | tee -a "$out/allreduce.jsonl"
  python3 -m torch.distributed.run --nproc-per-node 2 bench/gpu/allreduce_peer.py 1,16,256,1024 2>/dev/null | grep bench | tee -a "$out/allreduce_torch.jsonl"
fi
