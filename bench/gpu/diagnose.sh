#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's launch, occupancy, speed-of-light and warp-stall sections
# for the kernels of one single-token decode step (synthetic default-shape model), so the
# latency-bound launches can be read: registers, occupancy, and what the warps wait on.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu
export AUGUR_CACHE=/root/augur-cache
out=${OUT:-bench/gpu/out}
mkdir -p "$out"
ncu --clock-control none --cache-control none --launch-skip 160 --launch-count 6 \
    --section LaunchStats --section Occupancy --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    .gpu/bin/augur bench --device cuda --synthetic -p 8 -g 4 --runs 1 > "$out/diagnose.txt" 2>&1
grep -E "^  [a-z_0-9]+\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Memory Throughput|Compute \(SM\)|Stall|Warp Cycles Per Issued|Issued Warp|No Eligible|Active Warps Per" "$out/diagnose.txt" | head -150
