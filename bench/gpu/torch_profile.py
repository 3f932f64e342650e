#!/usr/bin/env python3
"""Where PyTorch eager's training step spends GPU time (torch.profiler): the top kernels of one
step of bench/gpu/train_peer.py's model, to compare with `AUGUR_CUDA_PROFILE=1 augur bench train`.

    python3 bench/gpu/torch_profile.py BENCH.json   # a line `augur bench train` printed (its "model")
"""
import json
import sys

import torch

from train_peer import setup, train_step

if len(sys.argv) != 2:
    sys.exit("usage: torch_profile.py BENCH.json (the JSON line `augur bench train --device cuda ...` printed)")
cfg = json.load(open(sys.argv[1]))["model"]
model, opt = setup(cfg)
for _ in range(3):
    train_step(model, opt, cfg, 8, 1024)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
    train_step(model, opt, cfg, 8, 1024)
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70))
