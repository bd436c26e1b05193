"""Pack what the seed's evaluation needs on the GPU machine into ``.devcarry/`` (64 MiB a call at most).

    python benchmarks/seed001/pack.py --data ../shared/data --out .devcarry

- ``minilm16/``: the embedded all-MiniLM-L6-v2 with its weights stored in fp16 and xz-compressed (41 MB
  instead of 91 MB); ``unpack.sh`` turns them back into fp32 there, so the base model on the GPU is MiniLM
  rounded to fp16 (relative change at most 2^-11 per weight), said beside every figure.
- ``data.tar.xz``: GLUE (CoLA, SST-2, MRPC, STS-B, RTE), the five DAPT tasks, SQuAD's re-split, and
  ``domain_text/biomed.txt``. IMDB and HyperPartisan texts are cut after their 256th MiniLM token in train
  and their 128th in dev and test (classification reads 126 besides [CLS] and [SEP], so its inputs are
  unchanged; TAPT sees the first 256 tokens of each training text).
- ``fedglue.tar.xz``: RTE, MRPC and SST-2 alone, for ``benchmarks/federated.py``'s call, whose Flower wheels
  leave no room for the whole data beside the model.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

GLUE = ("CoLA", "SST-2", "MRPC", "STS-B", "RTE")
DOMAINS = ("chemprot", "citation_intent", "sciie", "hyperpartisan", "imdb")
CUT = {"train": 256, "dev": 128, "test": 128}  # tokens kept per text of the long-document tasks
LONG = ("imdb", "hyperpartisan")


def cut_jsonl(path: Path, tokens: int, tokenizer) -> bytes:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    enc = tokenizer([r["text"] for r in rows], add_special_tokens=False, return_offsets_mapping=True)
    for row, offsets in zip(rows, enc["offset_mapping"], strict=True):
        if len(offsets) > tokens:
            row["text"] = row["text"][:offsets[tokens - 1][1]]
    return ("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n").encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default=".devcarry")
    opts = parser.parse_args()
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from unipelt.models import default_model_path

    data, out = Path(opts.data), Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(default_model_path())
    target = out / "minilm16"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(model / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              target / "model.safetensors", metadata={"format": "pt"})
    subprocess.run(["xz", "-9", "-T2", "-f", str(target / "model.safetensors")], check=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with tarfile.open(out / "data.tar.xz", "w:xz", preset=9) as tar:
        for task in GLUE:
            tar.add(data / "glue" / task, arcname=f"data/glue/{task}")
        for task in DOMAINS:
            for split in ("train", "dev", "test"):
                path = data / "domains" / task / f"{split}.jsonl"
                name = f"data/domains/{task}/{split}.jsonl"
                if task in LONG:
                    blob = cut_jsonl(path, CUT[split], tokenizer)
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                else:
                    tar.add(path, arcname=name)
        for name in ("resplit-train.json", "resplit-test.json"):
            tar.add(data / "squad" / name, arcname=f"data/squad/{name}")
        tar.add(data / "domain_text" / "biomed.txt", arcname="data/domain_text/biomed.txt")
    with tarfile.open(out / "fedglue.tar.xz", "w:xz", preset=9) as tar:  # benchmarks/federated.py's tasks only
        for task in ("RTE", "MRPC", "SST-2"):
            tar.add(data / "glue" / task, arcname=f"data/glue/{task}")
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.stat().st_size > 1 << 20:
            print(f"{path.stat().st_size / 2**20:6.1f} MiB  {path}")


if __name__ == "__main__":
    main()
