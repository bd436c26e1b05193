"""Train a tiny BERT's delta a few steps and save it, for each method config of a JSON list: alone
(``train(folder, config)`` in the test's process), or as one of the processes of
``torchrun --nproc_per_node N sharded_worker.py OUT CONFIGS_JSON``, where FSDP2 shards every encoder layer and the
root, each process takes its slice of every batch, and every process calls ``unipelt.save`` into ``OUT/<i>``.
tests/test_sharded.py compares the two."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification

import unipelt

STEPS, BATCH, SEQ = 3, 8, 12


def train(out: str | Path, config: dict, fsdp: bool = False, steps: int = STEPS) -> None:
    rank, world = (dist.get_rank(), dist.get_world_size()) if fsdp else (0, 1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))
    model = unipelt.attach(model, config)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    # SGD: its update is the gradient itself, so the two runs differ by float rounding only (AdamW would
    # turn rounding noise in a zero gradient into a full step)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(1, 96, (BATCH, SEQ), generator=data)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[::3, SEQ - 4:] = 0  # some padded rows
        labels = torch.randint(0, 3, (BATCH,), generator=data)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # FSDP averages the slices' gradients
        loss = model(input_ids=ids[part], attention_mask=mask[part], labels=labels[part]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unipelt.save(model, out)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for i, config in enumerate(json.loads(sys.argv[2])):
        train(Path(sys.argv[1]) / str(i), config, fsdp=True)
    # both ranks done before either tears down: a rank that exits while its peer still talks to it can abort
    # (a CI run once lost rank 1 to SIGABRT, 'terminate called without an active exception')
    dist.barrier()
    dist.destroy_process_group()
