"""PyTorch's scaled_dot_product_attention (flash backend) on the shapes `augur bench flash`
times: batch = tokens / seq, causal, bf16; forward and backward timed apart, median of RUNS
calls each after a warm-up; same FLOP convention (forward 4·B·H·S²·D, halved when causal;
backward 2.5 times the forward). One JSON line per sequence length."""
import json
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

SEQS = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1024,2048,4096,8192,16384").split(",")]
TOKENS, HEADS, DIM, RUNS = 16384, 32, 128, 10
dev = torch.device("cuda")


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


for seq in SEQS:
    batch = TOKENS // seq
    q, k, v = ((torch.rand(batch, HEADS, seq, DIM, device=dev, dtype=torch.bfloat16) * 2 - 1).requires_grad_() for _ in range(3))
    dout = torch.rand(batch, HEADS, seq, DIM, device=dev, dtype=torch.bfloat16) * 2 - 1
    fwd, bwd = [], []
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for run in range(RUNS + 1):
            holder = {}
            q.grad = k.grad = v.grad = None  # no accumulation kernel in the timed backward
            f = timed(lambda: holder.setdefault("o", F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            b = timed(lambda: holder["o"].backward(dout))
            if run > 0:
                fwd.append(f)
                bwd.append(b)
    f, b = statistics.median(fwd), statistics.median(bwd)
    flops = 4 * batch * HEADS * seq * seq * DIM / 2
    print(json.dumps({
        "bench": "flash", "engine": "torch " + torch.__version__ + " sdpa flash", "device": torch.cuda.get_device_name(),
        "dtype": "bf16", "causal": True, "batch": batch, "heads": HEADS, "seq": seq, "head_dim": DIM,
        "fwd_ms": f * 1e3, "bwd_ms": b * 1e3, "fwd_tflops": flops / f / 1e12,
        "bwd_tflops": 2.5 * flops / b / 1e12, "fwd_bwd_tflops": 3.5 * flops / (f + b) / 1e12,
    }), flush=True)
    del q, k, v, dout, holder
