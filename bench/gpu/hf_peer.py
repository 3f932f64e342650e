"""The GPU peer: HF transformers decode speed for SmolLM2-135M's architecture (random weights:
speed does not depend on them), bf16, batch 1, static KV cache, greedy. Prints one JSON line.

Decode rate = (gen - 1) / (time(generate gen tokens) - time(generate 1 token)), medians over runs,
so the prompt pass is not counted. Usage: python3 hf_peer.py [--prompt 128] [--gen 256] [--runs 5]
"""
import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--prompt", type=int, default=128)
p.add_argument("--gen", type=int, default=256)
p.add_argument("--runs", type=int, default=5)
a = p.parse_args()

cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (1, a.prompt), device="cuda")


def timed(n):
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       cache_implementation="static", pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t


timed(a.gen)  # warm-up (allocations, kernels)
timed(1)
full = [timed(a.gen) for _ in range(a.runs)]
first = [timed(1) for _ in range(a.runs)]
rate = (a.gen - 1) / (statistics.median(full) - statistics.median(first))
print(json.dumps({"peer": "hf-transformers", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                  "dtype": "bf16", "cache": "static", "prompt": a.prompt, "gen": a.gen, "runs": a.runs,
                  "decode_tok_per_s": round(rate, 1), "full_s": [round(x, 4) for x in full],
                  "first_token_s": [round(x, 4) for x in first]}))
