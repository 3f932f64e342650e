#!/usr/bin/env python3
"""GPU training speed, side by side: `augur bench train --device cuda` and the same GPT in PyTorch
on the same GPU (eager, then torch.compile), same batch, sequence length and precision (bf16
autocast, f32 master weights, AdamW), each timing full steps (forward, cross-entropy, backward,
AdamW) after warm-up steps; augur and eager alternate for --rounds, medians reported. Prints one
JSON line per run and the ratios.

    python3 bench/gpu/train_peer.py --augur .gpu/bin/augur --config bench/gpu/gpt-100m.json
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import importlib.util  # noqa: E402

# The CPU peer's model (bench/train_peer.py): the same architecture as augur's GPT.
_spec = importlib.util.spec_from_file_location("cpu_train_peer", os.path.join(os.path.dirname(__file__), "..", "train_peer.py"))
_cpu = importlib.util.module_from_spec(_spec)
sys.modules["cpu_train_peer"] = _cpu  # torch.compile re-imports the model's module by name
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
_spec.loader.exec_module(_cpu)
Gpt = _cpu.Gpt


class GpuGpt(Gpt):
    """The peer model with its RoPE tables made on the input's device."""

    def forward(self, ids):
        T = ids.shape[1]
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos.weight[:T]
        hd = self.c["dim"] // self.c["n_head"]
        inv = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32, device=ids.device) / hd))
        ang = torch.arange(T, dtype=torch.float32, device=ids.device)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        for b in self.blocks:
            x = b(x, cos, sin)
        x = self.norm_f(x)
        return F.linear(x, self.tok.weight) if self.head is None else self.head(x)


def setup(c):
    """The peer model on the GPU with AdamW, as augur's bench sets them up."""
    torch.manual_seed(0)
    model = GpuGpt(c).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def train_step(fwd, opt, c, batch, seq):
    """One full step on random windows: bf16 autocast forward, f32 cross-entropy, backward,
    AdamW; waits for the GPU (reads the loss)."""
    ids = torch.randint(0, c["vocab"], (batch, seq), device="cuda")
    tgt = torch.randint(0, c["vocab"], (batch, seq), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = fwd(ids)
    loss = F.cross_entropy(logits.float().reshape(-1, c["vocab"]), tgt.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()


def torch_run(c, batch, seq, steps, compiled):
    model, opt = setup(c)
    fwd = torch.compile(model) if compiled else model
    times = []
    for step in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(fwd, opt, c, batch, seq)
        if step >= 3:
            times.append(time.perf_counter() - t)
    times.sort()
    return batch * seq / times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--augur", default=".gpu/bin/augur")
    ap.add_argument("--config", default="bench/gpu/gpt-100m.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cmd = [a.augur, "bench", "train", "--device", "cuda", "--config", a.config, "--batch", str(a.batch), "--seq-len", str(a.seq_len),
           "--steps", str(a.steps), "--precision", "bf16"]
    # Alternate the engines (the GPU is shared: sittings differ); medians of --rounds each.
    ours, eager_runs = [], []
    for _ in range(a.rounds):
        out = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        print(json.dumps(out))
        ours.append(out["tokens_per_s"])
        cfg = out["model"]
        eager_runs.append(torch_run(cfg, a.batch, a.seq_len, a.steps, False))
        print(json.dumps({"engine": "torch eager", "tokens_per_s": eager_runs[-1]}))
    med = lambda v: sorted(v)[len(v) // 2]
    out["tokens_per_s"], eager = med(ours), med(eager_runs)
    try:
        compiled = torch_run(cfg, a.batch, a.seq_len, a.steps, True)
    except Exception as e:  # torch.compile needs a C compiler and Triton; say so instead of failing
        print(f"torch.compile unavailable: {e}", file=sys.stderr)
        compiled = None
    print(json.dumps({"engine": "torch.compile", "tokens_per_s": compiled}))
    print(json.dumps({
        "bench": "train_gpu", "parameters": out["parameters"], "batch": a.batch, "seq_len": a.seq_len, "precision": "bf16",
        "augur_tok_s": out["tokens_per_s"], "torch_eager_tok_s": eager, "torch_compile_tok_s": compiled,
        "ratio_eager": out["tokens_per_s"] / eager, "ratio_compile": compiled and out["tokens_per_s"] / compiled,
        "rounds": a.rounds, "augur_runs": ours, "torch_eager_runs": eager_runs, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
    }))


if __name__ == "__main__":
    main()
