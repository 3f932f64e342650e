"""The all-reduce peer: PyTorch's NCCL all-reduce (torch.distributed) on the sizes that
`augur bench allreduce --backend nccl --sweep ...` times, one process per GPU, f32 in place,
median of ITERS after a warm-up, each preceded by a barrier and waited for; rank 0 prints one
JSON line per size with nccl-tests' bus bandwidth (bytes / time · 2(n-1)/n).
Run: python3 -m torch.distributed.run --nproc-per-node 2 bench/gpu/allreduce_peer.py 1,16,256"""
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
SIZES = [float(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1,4,16,64,256").split(",")]
ITERS = 20
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(rank % torch.cuda.device_count())
for mib in SIZES:
    n = max(1, int(mib * (1 << 20)) // 4)
    buf = torch.zeros(n, dtype=torch.float32, device="cuda")
    times = []
    for i in range(ITERS + 1):
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        dist.all_reduce(buf)
        torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t)
    t = statistics.median(times)
    if rank == 0:
        b = n * 4
        print(json.dumps({"bench": "allreduce", "backend": "torch " + torch.__version__ + " nccl " + ".".join(map(str, torch.cuda.nccl.version())),
                          "ranks": world, "bytes": b, "median_ms": t * 1e3, "algorithm_gb_s": b / t / 1e9,
                          "bus_gb_s": b / t * 2 * (world - 1) / world / 1e9}), flush=True)
dist.destroy_process_group()
