#!/usr/bin/env bash
# Issue 5's GPU figures in one device call (about 6 minutes on an H100):
#   device run: bash benchmarks/speed_gpu.sh bert-base      (carry .whl: the adapters wheels, see below)
#   device run: bash benchmarks/speed_gpu.sh llama-1b
# The adapters peer needs adapters==1.3.0, transformers==4.57.6, tokenizers==0.22.2 and
# huggingface_hub==0.36.2 (and requests, charset-normalizer, idna, urllib3, certifi, which hub 0.36 imports)
# as Python 3.12 wheels in .whl (pip download ... -d .whl, see the device README);
# they are installed into /tmp/adapters-env, apart from the machine's own transformers.
set -euo pipefail
shape=${1:-bert-base}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-out/speed_gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
methods=()
if [ "$shape" = llama-1b ]; then methods=(--methods lora prefix prefix_mlp prompt ia3 ln pfeiffer unipelt); fi
python benchmarks/speed.py --shape "$shape" "${methods[@]}" --steps 30 --warmup 10 --device cuda \
    --adapters-env /tmp/adapters-env --adapters-wheels .whl --out "$out/speed_${shape}.json" 2>&1 | tee "$out/${shape}.log"
