#!/usr/bin/env bash
# On the GPU machine: per-kernel device time of single-token decode steps (Nsight Compute,
# clocks left alone), summed by kernel over the profiled launches. Usage: bench/gpu/profile.sh
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu
export AUGUR_CACHE=/root/augur-cache
# The first launches of `augur bench`: an 8-token prompt pass (213 kernels), then
# single-token decode steps (the same kernels a captured step replays); profile two steps.
ncu --clock-control none --launch-skip 213 --launch-count 426 \
    --metrics gpu__time_duration.sum --csv \
    .gpu/bin/augur bench --device cuda --synthetic -p 8 -g 4 --runs 1 2>/dev/null > /tmp/ncu.csv
python3 - <<'PY'
import csv, collections
rows = [r for r in csv.reader(open("/tmp/ncu.csv"))]
start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
hdr = rows[start]; rows = [r for r in rows[start + 1:] if len(r) == len(hdr)]
ki, vi, ui = hdr.index("Kernel Name"), hdr.index("Metric Value"), hdr.index("Metric Unit")
scale = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6}
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows:
    try: v = float(r[vi].replace(",", "")) * scale.get(r[ui], 1.0)
    except ValueError: continue
    tot[r[ki]] += v; cnt[r[ki]] += 1
all_ns = sum(tot.values())
print(f"{len(rows)} kernels, {all_ns/1e3:.1f} us in all (two decode steps)")
for k, v in sorted(tot.items(), key=lambda x: -x[1]):
    print(f"{k[:40]:40s} n={cnt[k]:4d} total {v/1e3:8.1f} us  mean {v/cnt[k]/1e3:6.2f} us")
PY
