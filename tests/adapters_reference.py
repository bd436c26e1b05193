"""The ``adapters`` library's outputs and input gradients for one of its configurations on a tiny BERT.

Run as a script in the environment where ``adapters`` and its pinned ``transformers`` live (the speed
benchmark's ``.bench/adapters-env``), never imported by the tests: ``python adapters_reference.py SPEC OUT``
with SPEC a JSON object ``{"config": [[class, kwargs], ...], "seed": int}`` (several entries: a ``ConfigUnion``).
It builds the model, moves every trainable weight of the configuration away from its initialisation (so a
misplaced part shows), and saves to OUT (``torch.save``):

- ``base``: the base model's weights; ``delta``: the configuration's trainable weights by name;
- ``input_ids``, ``attention_mask``: a batch whose last row is padded;
- for the batch, and for each row alone without its padding (``alone``): the final states of the real
  tokens (``states``, prompt positions removed), and the gradient of ``sum(states * direction)`` with
  respect to the word embeddings fed as ``inputs_embeds`` (``grad``).
"""

from __future__ import annotations

import json
import sys

import torch

CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
          "vocab_size": 100, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}
BATCH, SEQ, PAD_FROM = 3, 9, 6  # the last row has PAD_FROM real tokens


def build(spec: dict):
    import importlib.util
    from pathlib import Path

    import adapters
    import transformers

    # the speed benchmark's case file builds adapters' configurations; it imports nothing of unipelt's for them
    case_file = Path(__file__).resolve().parents[1] / "src" / "unipelt" / "bench" / "case.py"
    loaded = importlib.util.spec_from_file_location("unipelt_bench_case", case_file)
    case = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(case)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**CONFIG), add_pooling_layer=False).eval()
    adapters.init(model)
    model.add_adapter("ref", config=case.adapters_config(spec["config"]))
    model.train_adapter("ref")
    model.eval()
    return model


def prompt_positions(spec: dict) -> tuple[int, int]:
    """(where the prompt sits, its length) in the outputs, from the configuration's prompt-tuning part."""
    for name, kwargs in spec["config"]:
        if name == "PromptTuningConfig":
            return (1 if kwargs.get("combine") == "prefix_after_bos" else 0), kwargs.get("prompt_length", 10)
    return 0, 0


def directions(d: int) -> torch.Tensor:
    """The loss's direction for every (row, position) of the batch: a row run alone takes its own."""
    return torch.randn(BATCH, SEQ, d, generator=torch.Generator().manual_seed(5))


def run(model, spec: dict, ids: torch.Tensor, mask: torch.Tensor, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    states = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    at, n = prompt_positions(spec)
    if n:
        states = torch.cat([states[:, :at], states[:, at + n:]], dim=1)
    direction = directions(states.shape[-1])[rows, : states.shape[1]]
    (states * direction * mask[..., None]).sum().backward()
    return {"states": states.detach(), "grad": embeds.grad.detach()}


def main() -> None:
    spec, out = json.loads(sys.argv[1]), sys.argv[2]
    model = build(spec)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(spec.get("seed", 1))
    with torch.no_grad():
        for p in trainable.values():
            p.add_(torch.randn(p.shape, generator=g) * spec.get("noise", 0.2))
    ids = torch.randint(5, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, PAD_FROM:] = 0
    ids[-1, PAD_FROM:] = 0
    result = {"base": {k: v for k, v in model.state_dict().items() if k in base_names(model)},
              "delta": {k: v.detach().clone() for k, v in trainable.items()},
              "input_ids": ids, "attention_mask": mask, "batch": run(model, spec, ids, mask), "alone": []}
    for row in range(BATCH):
        real = int(mask[row].sum())
        result["alone"].append(run(model, spec, ids[row:row + 1, :real], mask[row:row + 1, :real],
                                  slice(row, row + 1)))
    torch.save(result, out)


def base_names(model) -> set[str]:
    """The base model's own weights (a fresh BERT of the same config has exactly these)."""
    import transformers

    return set(transformers.BertModel(transformers.BertConfig(**CONFIG), add_pooling_layer=False).state_dict())


if __name__ == "__main__":
    main()
