#!/usr/bin/env python3
"""Training speed, side by side: augur vs PyTorch CPU eager on the same GPT, batch and threads.

Runs `augur bench train` and the same model in PyTorch alternately (idle-gated like peers.py),
each timing full steps (forward, cross-entropy, backward, AdamW) after a warm-up step, and prints
the medians and the augur/PyTorch ratio of tokens/s.

    python3 bench/train_peer.py --config small --batch 8 --seq-len 256 --threads 2 --runs 5
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import resource  # noqa: E402

from peers import clean, cpu_jiffies, wait_idle  # noqa: E402


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h, kv = c["dim"], c["n_head"], c["n_kv_head"]
        self.h, self.kv, self.hd = h, kv, d // h
        Norm = (lambda: nn.LayerNorm(d, eps=c["norm_eps"], bias=True)) if c["norm"] == "layer" else (lambda: nn.RMSNorm(d, eps=c["norm_eps"]))
        self.norm1, self.norm2 = Norm(), Norm()
        self.wq = nn.Linear(d, h * self.hd, bias=c["bias"])
        self.wk = nn.Linear(d, kv * self.hd, bias=c["bias"])
        self.wv = nn.Linear(d, kv * self.hd, bias=c["bias"])
        self.wo = nn.Linear(h * self.hd, d, bias=c["bias"])
        self.swiglu = c["mlp"] == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(d, c["hidden"], bias=False)
            self.up = nn.Linear(d, c["hidden"], bias=False)
            self.down = nn.Linear(c["hidden"], d, bias=False)
        else:
            self.fc = nn.Linear(d, c["hidden"], bias=c["bias"])
            self.proj = nn.Linear(c["hidden"], d, bias=c["bias"])
        self.rope = c["pos"] == "rope"
        self.theta = c["rope_theta"]

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a = self.norm1(x)
        q = self.wq(a).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.wk(a).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.wv(a).view(B, T, self.kv, self.hd).transpose(1, 2)
        if self.rope:
            def rot(t):
                t0, t1 = t[..., : self.hd // 2], t[..., self.hd // 2:]
                return torch.cat([t0 * cos - t1 * sin, t0 * sin + t1 * cos], -1)
            q, k = rot(q), rot(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, -1))
        m = self.norm2(x)
        m = self.down(F.silu(self.gate(m)) * self.up(m)) if self.swiglu else self.proj(F.gelu(self.fc(m), approximate="tanh"))
        return x + m


class Gpt(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.tok = nn.Embedding(c["vocab"], c["dim"])
        self.pos = nn.Embedding(c["max_seq"], c["dim"]) if c["pos"] == "learned" else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["n_layer"]))
        self.norm_f = nn.LayerNorm(c["dim"], eps=c["norm_eps"]) if c["norm"] == "layer" else nn.RMSNorm(c["dim"], eps=c["norm_eps"])
        self.head = None if c["tied"] else nn.Linear(c["dim"], c["vocab"], bias=False)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos.weight[:T]
        hd = self.c["dim"] // self.c["n_head"]
        inv = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        for b in self.blocks:
            x = b(x, cos, sin)
        x = self.norm_f(x)
        return F.linear(x, self.tok.weight) if self.head is None else self.head(x)


def torch_run(c, batch, seq, steps, precision):
    torch.manual_seed(0)
    model = Gpt(c)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, c["vocab"], (batch, seq))
        tgt = torch.randint(0, c["vocab"], (batch, seq))
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(ids)
        loss = F.cross_entropy(logits.float().reshape(-1, c["vocab"]), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t)
    times.sort()
    return batch * seq / times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--augur", default="target/release/augur")
    ap.add_argument("--config", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--precision", default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cmd = [a.augur, "bench", "train", "--config", a.config, "--batch", str(a.batch), "--seq-len", str(a.seq_len),
           "--threads", str(a.threads), "--steps", str(a.steps), "--precision", a.precision]
    ours, theirs = [], []
    cfg = None
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count()
    while len(ours) < a.runs:
        stdout, _ = clean(cmd)
        out = json.loads(stdout)
        cfg = out["model"]
        wait_idle()
        r0, (b0, _), w0 = resource.getrusage(resource.RUSAGE_SELF), cpu_jiffies(), time.time()
        tps = torch_run(cfg, a.batch, a.seq_len, a.steps, a.precision)
        r1, (b1, _), wall = resource.getrusage(resource.RUSAGE_SELF), cpu_jiffies(), time.time() - w0
        own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        if max(0.0, (b1 - b0) / hz - own) / (wall * ncpu) > 0.05:
            print("  (discarded a torch run: foreign CPU load)", file=sys.stderr)
            continue
        ours.append(out["tokens_per_s"])
        theirs.append(tps)
        print(f"run {len(ours)}: augur {ours[-1]:.1f} tok/s, torch {theirs[-1]:.1f} tok/s", file=sys.stderr)
    med = lambda v: sorted(v)[len(v) // 2]
    print(json.dumps({
        "config": a.config, "parameters": out["parameters"], "batch": a.batch, "seq_len": a.seq_len, "threads": a.threads,
        "precision": a.precision, "augur_tok_s": med(ours), "torch_tok_s": med(theirs), "ratio": med(ours) / med(theirs),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
