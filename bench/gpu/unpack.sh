#!/usr/bin/env bash
# On the GPU machine: keep the part of the model (and data) that pack.sh staged in .gpu/partK in
# /root, where it waits for the next call on the warm machine; once every part is there, assemble
# /root/model.gguf (and /root/data). Safe to run in every call.
set -euo pipefail
for p in .gpu/part*/; do
  [ -d "$p" ] || continue
  cp "$p"/blob.* /root/ 2>/dev/null || true
  cp "$p/parts" /root/blob-parts
done
if [ ! -f /root/model.gguf ] && [ -f /root/blob-parts ] && [ "$(ls /root/blob.* 2>/dev/null | wc -l)" -eq "$(cat /root/blob-parts)" ]; then
  cat /root/blob.* | tar -xf - -C /root && rm -f /root/blob.*
fi
if [ -f /root/model.gguf ]; then echo "model: /root/model.gguf$( [ -d /root/data ] && echo ', data: /root/data')"; else echo "waiting: $(ls /root/blob.* 2>/dev/null | wc -l) of $(cat /root/blob-parts 2>/dev/null || echo '?') parts in /root"; fi
