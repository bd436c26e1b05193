"""Trainable parameters of every method on BERT-base shapes (random weights, no download).

Prints a markdown table (used in the README) and writes benchmarks/results/param_table.json.
Counts exclude the task head; prefix rows show the count while training (with the
reparametrising MLP) and the count saved (prefixes only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

import unipelt
from unipelt.core import deltas

ROWS = [
    ("lora", "lora"), ("houlsby", "houlsby"), ("pfeiffer", "pfeiffer"), ("parallel", "parallel"),
    ("scaled_parallel", "scaled_parallel"), ("bitfit", "bitfit"), ("ia3", "ia3"), ("ln", "ln"),
    ("prefix", "prefix"), ("prompt", "prompt"), ("mam", "mam"), ("mam_glue", "mam_glue"), ("unipelt", "unipelt"),
    ("unipelt + prompt", {"method": "unipelt", "prompt": True}), ("unipelt_legacy", "unipelt_legacy"),
    ("compacter", "compacter"), ("compacter++", "compacter++"), ("phm_adapter", "phm_adapter"),
    ("krona", "krona"), ("krona_ffn", "krona_ffn"), ("kadaptation", "kadaptation"), ("adapter_bias", "adapter_bias"),
    ("sparse_adapter", "sparse_adapter"),
    ("sparse_adapter large-sparse", {"method": "sparse_adapter", "large_sparse": True}),
    ("rational", "rational"),
    ("poly (3 tasks)", {"method": "poly", "tasks": 3}), ("poly_s (3 tasks)", {"method": "poly_s", "tasks": 3}),
    ("poly_mu", "poly_mu"),
]


def main() -> None:
    torch.manual_seed(0)
    base = BertModel(BertConfig())
    total_base = sum(p.numel() for p in base.parameters())
    results = []
    for label, config in ROWS:
        model = unipelt.attach(base, config, train_head=False)
        train = unipelt.trainable_parameters(model)["total"]
        saved = sum(t.numel() for m in deltas(model).values() for t in m.delta_state().values())
        results.append({"method": label, "trainable": train, "saved": saved, "percent": 100.0 * train / total_base})
        unipelt.detach(model)
    print(f"BERT-base ({total_base:,} parameters), counts without the task head\n")
    print("| method | trainable | % of BERT-base | saved in delta |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f}% | {r['saved']:,} |")
    out = Path(__file__).parent / "results" / "param_table.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"base": "bert-base (random init)", "base_parameters": total_base,
                               "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
