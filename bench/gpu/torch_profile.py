#!/usr/bin/env python3
"""Where PyTorch eager's training step spends GPU time (torch.profiler): the top kernels of one
step of bench/gpu/train_peer.py's model, to compare with `AUGUR_CUDA_PROFILE=1 augur bench train`."""
import json
import sys

import torch
import torch.nn.functional as F

from train_peer import GpuGpt

cfg = json.load(open(sys.argv[1]))["model"] if len(sys.argv) > 1 else None
model = GpuGpt(cfg).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def step():
    ids = torch.randint(0, cfg["vocab"], (8, 1024), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids)
    loss = F.cross_entropy(logits.float().reshape(-1, cfg["vocab"]), ids.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()


for _ in range(3):
    step()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
    step()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70))
