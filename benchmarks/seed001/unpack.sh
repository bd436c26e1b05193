#!/usr/bin/env bash
# On the GPU machine: unpack the data carried in .devcarry/ into $1 (default /tmp/seed001) and store the
# fp16-carried MiniLM as fp32 there (see pack.py).
set -euo pipefail
dest=${1:-/tmp/seed001}
mkdir -p "$dest"
# each call carries what it needs: the whole data (data.tar.xz) or only the federated benchmark's GLUE tasks
for archive in .devcarry/data.tar.xz .devcarry/fedglue.tar.xz; do
    if [ -f "$archive" ]; then tar -xJf "$archive" -C "$dest"; fi
done
rm -rf "$dest/minilm" && cp -r .devcarry/minilm16 "$dest/minilm"
xz -d "$dest/minilm/model.safetensors.xz"
python - "$dest/minilm/model.safetensors" <<'PY'
import sys
import torch
from safetensors.torch import load_file, save_file
path = sys.argv[1]
weights = load_file(path)
save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}, path,
          metadata={"format": "pt"})
PY
echo "unpacked into $dest"
