"""Training speed and memory of every method, side by side with peft and adapters (same as ``unipelt bench``).

    python benchmarks/speed.py                       # bert-base on a GPU, bert-small on the CPU
    python benchmarks/speed.py --shape llama-1b --methods lora prefix prompt ia3
    python benchmarks/speed.py --adapters-wheels .whl --out out/speed/h100_bert_base.json

Each case runs in its own process; the JSON holds one row per (method, peer) with ``ours_ms``,
``peer_ms``, ``floor_ms``, ``ratio_vs_peer``, ``ratio_vs_floor``, peak memory, inference latency
(unmerged and merged) and trainable-parameter counts. See ``unipelt.bench``.
"""

import sys

from unipelt.bench import main

if __name__ == "__main__":
    sys.exit(main())
