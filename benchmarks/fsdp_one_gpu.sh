#!/usr/bin/env bash
# Issue 28 point 8 on one GPU: `unipelt train` under an accelerate FSDP2 config, the route `--fsdp` does not
# take (accelerate shards only on GPUs; one process takes its whole path: prepare, checkpoints, best-step
# restore, save), against the same run without FSDP. From the repository root on the GPU machine:
#   run(command="bash benchmarks/fsdp_one_gpu.sh", carry=[".devcarry/fedglue.tar.xz", ".devcarry/minilm16"])
# (the GPU image lacks the embedded model's package: the tokenizer comes from the carried MiniLM folder)
# Prints both runs' sharding and the largest difference between their deltas; exits 1 if it is not FSDP2 or
# the deltas differ by more than 1e-5.
set -euo pipefail
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1
work=/tmp/fsdp_one_gpu
rm -rf "$work" && mkdir -p "$work"
tar -xJf .devcarry/fedglue.tar.xz -C "$work"
python3 -c "from unipelt.models import save_tiny_model; save_tiny_model('$work/tiny',
    tokenizer_from='.devcarry/minilm16', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)"
args=(train --task sst2 --method unipelt --model "$work/tiny" --data-dir "$work/data/glue" --k-shot 64
      --max-steps 40 --eval-every 10 --patience 100 --batch-size 16 --max-length 64 --mixed-precision no
      --no-progress)
python3 -m unipelt "${args[@]}" --out "$work/plain" | tail -2
python3 -m accelerate.commands.launch --num_processes 1 --use_fsdp --fsdp_version 2 --mixed_precision no \
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap BertLayer \
    -m unipelt "${args[@]}" --out "$work/fsdp" | tail -2
python3 - "$work" <<'PY'
import json, sys
from safetensors.torch import load_file
work = sys.argv[1]
runs = {name: json.load(open(f"{work}/{name}/results.json")) for name in ("plain", "fsdp")}
a, b = (load_file(f"{work}/{name}/delta.safetensors") for name in ("plain", "fsdp"))
diff = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")
print({name: (r["sharding"], r["score"], r["validation"]["best_step"]) for name, r in runs.items()},
      "max |delta difference|:", diff)
sys.exit(0 if runs["fsdp"]["sharding"] == "fsdp2" and diff <= 1e-5 else 1)
PY
