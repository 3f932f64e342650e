# Sourced by the scripts here on the GPU machine: CUDA's libraries on the path, the NVRTC cache
# that pack.sh staged in the kernel cache, $out for results ($OUT, or bench/gpu/out), and
# /work/main pointing here (test binaries find their data through the path they were built at).
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu
export AUGUR_CACHE=/root/augur-cache
out=${OUT:-bench/gpu/out}
mkdir -p "$out" "$AUGUR_CACHE/cuda"
if [ -d .gpu/cache/cuda ]; then cp .gpu/cache/cuda/* "$AUGUR_CACHE/cuda/"; fi
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
