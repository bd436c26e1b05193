"""Under ``torch.compile`` a model with a delta returns from its forward graph what the bare model returns.

The model's forward is one frame, the core's call rewrites (a prompt's) included: a tensor a method leaves
in the forward context when that frame returns leaves the graph as an extra output, and the backward then
builds and copies a zero gradient for each (the PHM family's weights did: 48 per BERT-base step). Per-pass
values are therefore dropped at their last read (``ForwardContext.once(..., uses=n)``).
"""

from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import build, inputs
from unipelt.runtime import ForwardContext


def _graph_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[int]:
    torch._dynamo.reset()
    counts: list[int] = []

    def count_outputs(graph_module, example_inputs):
        counts.append(len(graph_module.graph.find_nodes(op="output")[0].args[0]))
        return graph_module.forward

    torch.compile(model, backend=count_outputs)(**batch)
    torch._dynamo.reset()
    return counts


@pytest.mark.parametrize("config", [
    {"method": "compacter", "bottleneck": 8},
    {"method": "phm_adapter", "bottleneck": 8, "n": 4},
    {"method": "prefix", "reparam": True},
    {"method": "prefix", "gate": True},  # pooled gate: the mask's per-token weights are a per-pass value
    {"method": "mam"},
    {"method": "unipelt"},
    {"method": "lora", "gate": True},
    {"method": "poly_s"},  # one task: the group's mixed pairs are a per-pass value
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_no_per_pass_value_leaves_the_compiled_graph(config: dict) -> None:
    batch = inputs("bert")  # padded: the gates pool over real tokens
    bare = _graph_outputs(build("bert"), batch)
    model = build("bert")
    unipelt.attach(model, config)
    assert _graph_outputs(model, batch) == bare


@pytest.mark.parametrize(("family", "config"), [
    ("bert", {"method": "prompt", "length": 4}),
    ("llama", {"method": "prompt", "length": 4}),
    ("t5", {"method": "prompt", "length": 4}),
    ("bert", {"method": "attempt", "length": 4, "n_sources": 2}),
    ("llama", {"method": "attempt", "length": 4, "n_sources": 2}),
], ids=lambda v: v if isinstance(v, str) else v["method"])
def test_a_prompts_call_rewrite_is_traced_into_the_models_one_graph(family: str, config: dict) -> None:
    """As module hooks, the rewrite that widens ``input_ids`` and the mask ran outside the compiled forward:
    a graph of its own before it and one after (three CUDA graphs a step, the first one's outputs kept in
    the graph pool: 1.9 MB at BERT-base, run 45). Called from the wrapped ``forward`` it is traced with it."""
    batch = inputs(family)
    model = build(family)
    unipelt.attach(model, config)
    assert len(_graph_outputs(model, batch)) == len(_graph_outputs(build(family), batch)) == 1


def test_once_computes_once_and_drops_the_value_at_its_last_read() -> None:
    context = ForwardContext()
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.full((1,), float(len(calls)))

    reads = [context.once("w", compute, uses=3) for _ in range(3)]
    assert len(calls) == 1 and all(r is reads[0] for r in reads)
    assert "w" not in context.values  # dropped at the third read
    assert context.once("w", compute, uses=3).item() == 2.0  # a fourth read computes anew
    context.reset()
    assert not context.values and not context.reads
    kept = context.once("k", compute)  # without uses: kept for the rest of the pass
    assert context.once("k", compute) is kept and context.values["k"] is kept
