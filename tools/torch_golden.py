#!/usr/bin/env python3
"""Golden file for augur's training core: one training step of a tiny GPT in PyTorch.

For each configuration in CONFIGS this builds the same GPT as augur-nn (`crates/nn/src/gpt.rs`)
in plain PyTorch, runs one step on a fixed batch (forward, cross-entropy loss, backward, clip the
global gradient norm to 1.0, AdamW with decay on matrices only) and writes, under the parameter
names augur uses:
  param.<name>  the initial parameters     grad.<name>  their gradients
  new.<name>    the parameters after AdamW  ids, targets, loss
to crates/nn/tests/data/golden_<name>.safetensors, plus the config as golden_<name>.json.

Run with torch installed (pinned below for reproducibility; any recent version agrees to ~1e-6):
    python3 tools/torch_golden.py
"""
import json
import math
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

TORCH_PINNED = "2.15.0"
OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/nn/tests/data"

BASE = dict(vocab=61, dim=32, n_layer=2, n_head=4, n_kv_head=2, hidden=64, max_seq=16, rope_theta=10000.0,
            bias=False, tied=False, dropout=0.0, norm_eps=1e-5, init_std=0.02, seed=0)
CONFIGS = {
    # Llama-style: RMSNorm, SwiGLU, RoPE, grouped KV heads, separate head.
    "llama": dict(BASE, pos="rope", norm="rms", mlp="swiglu"),
    # GPT-2-style: LayerNorm, GELU, learned positions, biases, tied head.
    "gpt2": dict(BASE, pos="learned", norm="layer", mlp="gelu", bias=True, tied=True, n_kv_head=4),
}
LR, BETAS, EPS, WD, CLIP = 1e-2, (0.9, 0.95), 1e-8, 0.1, 1.0
BATCH, SEQ = 2, 8


def params(c, g):
    """Initial parameters by augur name (random norms and biases too, so every rule is exercised)."""
    d, h, kv, hid = c["dim"], c["n_head"], c["n_kv_head"], c["hidden"]
    hd = d // h
    p = {}
    mat = lambda o, i: torch.randn(o, i, generator=g) * 0.05
    vec = lambda n, base: base + 0.1 * torch.randn(n, generator=g)
    p["tok_emb.weight"] = mat(c["vocab"], d)
    if c["pos"] == "learned":
        p["pos.weight"] = mat(c["max_seq"], d)
    for l in range(c["n_layer"]):
        b = f"blocks.{l}"
        for n in ("norm1", "norm2"):
            p[f"{b}.{n}.weight"] = vec(d, 1.0)
            if c["norm"] == "layer":
                p[f"{b}.{n}.bias"] = vec(d, 0.0)
        for n, o in (("wq", h * hd), ("wk", kv * hd), ("wv", kv * hd)):
            p[f"{b}.attn.{n}.weight"] = mat(o, d)
            if c["bias"]:
                p[f"{b}.attn.{n}.bias"] = vec(o, 0.0)
        p[f"{b}.attn.wo.weight"] = mat(d, h * hd)
        if c["bias"]:
            p[f"{b}.attn.wo.bias"] = vec(d, 0.0)
        if c["mlp"] == "swiglu":
            p[f"{b}.mlp.gate.weight"] = mat(hid, d)
            p[f"{b}.mlp.up.weight"] = mat(hid, d)
            p[f"{b}.mlp.down.weight"] = mat(d, hid)
        else:
            p[f"{b}.mlp.fc.weight"] = mat(hid, d)
            p[f"{b}.mlp.proj.weight"] = mat(d, hid)
            if c["bias"]:
                p[f"{b}.mlp.fc.bias"] = vec(hid, 0.0)
                p[f"{b}.mlp.proj.bias"] = vec(d, 0.0)
    p["norm_f.weight"] = vec(d, 1.0)
    if c["norm"] == "layer":
        p["norm_f.bias"] = vec(d, 0.0)
    if not c["tied"]:
        p["head.weight"] = mat(c["vocab"], d)
    return {k: v.clone().requires_grad_(True) for k, v in p.items()}


def forward(c, p, ids):
    B, T = ids.shape
    d, h, kv = c["dim"], c["n_head"], c["n_kv_head"]
    hd = d // h
    lin = lambda x, n: F.linear(x, p[n + ".weight"], p.get(n + ".bias"))

    def norm(x, n):
        if c["norm"] == "layer":
            return F.layer_norm(x, (d,), p[n + ".weight"], p[n + ".bias"], c["norm_eps"])
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["norm_eps"]) * p[n + ".weight"]

    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x):  # rotate-half pairs (i, i + hd/2)
        x0, x1 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)

    x = p["tok_emb.weight"][ids]
    if c["pos"] == "learned":
        x = x + p["pos.weight"][:T]
    for l in range(c["n_layer"]):
        b = f"blocks.{l}"
        a = norm(x, f"{b}.norm1")
        q = lin(a, f"{b}.attn.wq").view(B, T, h, hd).transpose(1, 2)
        k = lin(a, f"{b}.attn.wk").view(B, T, kv, hd).transpose(1, 2)
        v = lin(a, f"{b}.attn.wv").view(B, T, kv, hd).transpose(1, 2)
        if c["pos"] == "rope":
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(h // kv, dim=1)
        v = v.repeat_interleave(h // kv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + lin(o.transpose(1, 2).reshape(B, T, d), f"{b}.attn.wo")
        m = norm(x, f"{b}.norm2")
        if c["mlp"] == "swiglu":
            m = F.linear(F.silu(F.linear(m, p[f"{b}.mlp.gate.weight"])) * F.linear(m, p[f"{b}.mlp.up.weight"]), p[f"{b}.mlp.down.weight"])
        else:
            m = lin(F.gelu(lin(m, f"{b}.mlp.fc"), approximate="tanh"), f"{b}.mlp.proj")
        x = x + m
    x = norm(x, "norm_f")
    return F.linear(x, p["head.weight"] if "head.weight" in p else p["tok_emb.weight"])


def main():
    torch.set_num_threads(1)
    for name, c in CONFIGS.items():
        g = torch.Generator().manual_seed(1234)
        p = params(c, g)
        ids = torch.randint(0, c["vocab"], (BATCH, SEQ), generator=g)
        targets = torch.randint(0, c["vocab"], (BATCH, SEQ), generator=g)
        logits = forward(c, p, ids)
        loss = F.cross_entropy(logits.reshape(-1, c["vocab"]), targets.reshape(-1))
        loss.backward()
        out = {f"param.{k}": v.detach().clone() for k, v in p.items()}
        out.update({f"grad.{k}": v.grad.detach().clone() for k, v in p.items()})
        torch.nn.utils.clip_grad_norm_(list(p.values()), CLIP)
        decay = [v for v in p.values() if v.dim() >= 2]
        no_decay = [v for v in p.values() if v.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
        opt.step()
        out.update({f"new.{k}": v.detach().clone() for k, v in p.items()})
        out["ids"] = ids.float()
        out["targets"] = targets.float()
        out["loss"] = loss.detach().reshape(1)
        OUT.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / f"golden_{name}.safetensors"))
        cfg = {k: v for k, v in c.items()}
        cfg["train"] = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, clip=CLIP, batch=BATCH, seq=SEQ, torch=torch.__version__)
        (OUT / f"golden_{name}.json").write_text(json.dumps(cfg, indent=1) + "\n")
        print(f"{name}: loss {loss.item():.6f}, {len(p)} parameters")
    if not torch.__version__.startswith(TORCH_PINNED):
        print(f"note: made with torch {torch.__version__}; pinned {TORCH_PINNED}")


if __name__ == "__main__":
    main()
