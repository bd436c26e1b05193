"""Sharded training: FSDP2 over two CPU processes (gloo) trains every method's delta as one process does, and
``unipelt.save`` on every process writes the whole delta once; the ZeRO-3 path gathers before it reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unipelt
from unipelt import sharded
from unipelt.serialization import delta_tensors

sys.path.insert(0, str(Path(__file__).parent))
import sharded_worker  # noqa: E402

# every method that applies to a BERT classifier (ATTEMPT needs trained source prompts, VPT an image model);
# dropout off where a method has its own, so both runs draw nothing at random
CONFIGS = [{"method": name} for name in (
    "adapter_bias", "bitfit", "compacter", "compacter++", "houlsby", "ia3", "kadaptation", "krona", "krona_ffn", "ln",
    "lora", "mam", "parallel", "pfeiffer", "poly", "poly_mu", "poly_s", "prefix", "prompt", "rational",
    "scaled_parallel", "unipelt", "unipelt_legacy")] + [
    {"method": "sparse_adapter", "dropout": 0.0}, {"method": "phm_adapter", "n": 4},
    {"method": "unipelt", "prompt": True}, {"method": "lora", "dora": True}, {"method": "lora", "init": "pissa"}]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
         str(Path(__file__).parent / "sharded_worker.py"), str(root), json.dumps(CONFIGS)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stderr[-4000:]
    return root


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[json.dumps(c) for c in CONFIGS])
def test_fsdp_trains_and_saves_the_delta_one_process_does(sharded_runs, tmp_path, index) -> None:
    """Two processes, each with half of every batch, FSDP2 over every encoder layer and the root: the saved
    delta has every tensor whole (no shard, no empty placeholder) and equals one process's within rounding.
    A method whose hook kept a parameter from install (FSDP swaps parameters each forward) trains nothing."""
    sharded_worker.train(tmp_path / "one", CONFIGS[index])
    sharded_worker.train(tmp_path / "start", CONFIGS[index], steps=0)
    one = load_file(tmp_path / "one" / "delta.safetensors")
    two = load_file(sharded_runs / str(index) / "delta.safetensors")
    start = load_file(tmp_path / "start" / "delta.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # it trained
    for k in one:
        assert two[k].shape == one[k].shape, k
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-6, msg=k)
    meta_one = json.loads((tmp_path / "one" / "unipelt.json").read_text())
    meta_two = json.loads((sharded_runs / str(index) / "unipelt.json").read_text())
    for meta in (meta_one, meta_two):
        meta.pop("delta_sha256")
    assert meta_two == meta_one  # the base's class and fingerprint read through the shards


def test_zero3_placeholders_are_gathered_before_the_delta_is_read(monkeypatch) -> None:
    """DeepSpeed ZeRO-3 leaves each parameter an empty placeholder outside ``GatheredParameters``; save must read
    inside it. DeepSpeed needs an accelerator, so a stand-in module plays its part: placeholders out, values in."""
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification

    model = unipelt.attach(BertForSequenceClassification(BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)), {"method": "lora"})
    for p in model.parameters():
        torch.nn.init.normal_(p) if p.requires_grad else None
    expected = delta_tensors(model)
    full = {id(p): p.data for p in model.parameters()}
    for i, p in enumerate(model.parameters()):
        p.ds_id = i
        p.data = torch.empty(0)  # ZeRO-3's placeholder
    gathered_lists = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            self.params = list(params)
            gathered_lists.append(self.params)

        def __enter__(self):
            for p in self.params:
                p.data = full[id(p)]

        def __exit__(self, *exc):
            for p in self.params:
                p.data = torch.empty(0)

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=types.SimpleNamespace(
        GatheredParameters=GatheredParameters)))
    assert sharded.is_sharded(model)
    got = delta_tensors(model)
    assert gathered_lists and got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(("how", "says"), [("fsdp1", "fsdp_version: 2"), ("zero3", "does not train under DeepSpeed")])
def test_the_training_command_refuses_fsdp1_and_zero3(how, says, monkeypatch, tmp_path, capsys) -> None:
    """``unipelt train`` trains under FSDP2 (``--fsdp``, tests/test_cli.py); under FSDP1 or DeepSpeed it stops
    with one line naming the way (accelerate's FSDP and DeepSpeed only shard on GPUs, so the check is made to see
    a sharded model)."""
    from unipelt.cli import EXIT_BAD_INPUT, main
    from unipelt.models import save_tiny_model
    from unipelt.train import loop

    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = "".join(f"{w} film\t{i % 2}\n" for i, w in enumerate(["good", "bad", "fine", "dull"] * 4))
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    model = save_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(loop.sharded, "kind", lambda model: how)
    capsys.readouterr()
    code = main(["train", "--task", "sst2", "--method", "lora", "--model", model,
                 "--data-dir", str(tmp_path / "glue"), "--out", str(tmp_path / "out"), "--k-shot", "4",
                 "--max-steps", "1", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and len(err.splitlines()) == 1, err
    assert says in err
