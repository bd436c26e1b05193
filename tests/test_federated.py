"""Federated PEFT on Flower (``unipelt.federated``): shards, FedAvg of the deltas, bytes, faults, resume, and the
server and clients as processes of their own.

Runs use the 2-layer BERT of test_cli and 3 clients x 2 rounds on a K-shot slice of SST-2 (a second or two each).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from test_cli import needs_glue, small_glue, tiny_model  # noqa: F401  (fixtures)
from unipelt import federated
from unipelt.cli import EXIT_BAD_INPUT, main
from unipelt.config import ConfigError
from unipelt.federated import FederatedConfig, PeftClient, dirichlet_shards, iid_shards, run_federated

QUIET = {"log": lambda line: None}


def config(model: str, data: Path, out: Path, **kw) -> FederatedConfig:
    base = dict(task="sst2", method="lora", model=model, data_dir=str(data), out=str(out), clients=3, per_round=2,
                rounds=2, k_shot=48, batch_size=8)
    return FederatedConfig(**{**base, **kw})


@pytest.fixture
def spy(monkeypatch) -> list[tuple[int, int, dict[str, torch.Tensor], int]]:
    """Every client result of a run: (round, client, the delta it sent, its example count)."""
    seen: list[tuple[int, int, dict[str, torch.Tensor], int]] = []
    fit = PeftClient.fit

    def recording_fit(self, ins):
        res = fit(self, ins)
        seen.append((int(ins.config["round"]), self.cid, federated.from_parameters(res.parameters), res.num_examples))
        return res

    monkeypatch.setattr(PeftClient, "fit", recording_fit)
    return seen


def example_weighted_mean(results: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in results)
    return {k: sum(d[k].double() * n for d, n in results) / total for k in results[0][0]}


# --------------------------------------------------------------------------------------------------- shards


def test_iid_shards_partition_the_examples_and_repeat_per_seed():
    shards = iid_shards(103, 4, seed=7)
    assert sorted(i for s in shards for i in s) == list(range(103))
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    assert shards == iid_shards(103, 4, seed=7)
    assert shards != iid_shards(103, 4, seed=8)


def test_dirichlet_shards_partition_repeat_per_seed_and_skew_with_small_alpha():
    labels = [i % 3 for i in range(600)]
    skewed = dirichlet_shards(labels, 5, alpha=0.1, seed=3)
    assert sorted(i for s in skewed for i in s) == list(range(600))
    assert skewed == dirichlet_shards(labels, 5, alpha=0.1, seed=3)
    assert skewed != dirichlet_shards(labels, 5, alpha=0.1, seed=4)

    def majority_share(shards):  # how much of a client's shard its most common label takes, averaged
        shares = [Counter(labels[i] for i in s).most_common(1)[0][1] / len(s) for s in shards if s]
        return sum(shares) / len(shares)

    near_iid = dirichlet_shards(labels, 5, alpha=1000.0, seed=3)
    assert majority_share(skewed) > 0.8
    assert majority_share(near_iid) < 0.45  # 1/3 each when IID
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_shards(labels, 5, alpha=0.0, seed=3)


# ----------------------------------------------------------------------------------------------- payloads


def test_weighted_mean_weights_by_examples_and_refuses_mismatched_deltas():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 8.0])}
    torch.testing.assert_close(federated.weighted_mean([(a, 1), (b, 3)])["w"], torch.tensor([3.25, 6.5]))
    with pytest.raises(ValueError, match="different tensors"):
        federated.weighted_mean([(a, 1), ({"v": torch.zeros(2)}, 1)])


def test_payload_round_trips_and_its_length_is_the_safetensors_size():
    tensors = {"b": torch.randn(3, 4), "a": torch.arange(5.0)}
    payload = federated.encode(tensors)
    assert len(payload) == len(save_bytes(dict(sorted(tensors.items()))))
    back = federated.decode(payload)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------------------------------- runs


@needs_glue
def test_aggregated_delta_is_the_example_weighted_mean_and_bytes_are_the_payload_sizes(
        tiny_model, small_glue, tmp_path, spy):  # noqa: F811
    results = run_federated(config(tiny_model, small_glue, tmp_path / "run", alpha=1.0), **QUIET)
    assert [h["round"] for h in results["history"]] == [1, 2]
    assert sum(results["shard_sizes"]) == 48 and len(results["shard_sizes"]) == 3
    last = [(d, n) for rnd, _, d, n in spy if rnd == 2]
    assert len(last) == 2  # per_round clients answered
    expected = example_weighted_mean(last)
    payload = federated.decode(federated.encode({k: v.float() for k, v in expected.items()}))
    state = federated.decode(federated.load_state(tmp_path / "run" / federated.STATE_FILE)[0])
    for name in expected:
        torch.testing.assert_close(state[name].double(), expected[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(state[name], payload[name], rtol=0, atol=1e-6)
    for h in results["history"]:
        sent = {cid: d for rnd, cid, d, _ in spy if rnd == h["round"]}
        for entry in h["clients"]:
            assert entry["bytes_up"] == len(federated.encode(sent[entry["client"]]))
            assert entry["bytes_down"] == results["payload_bytes"]
            assert entry["train_time_s"] > 0
        assert h["bytes_up"] == sum(e["bytes_up"] for e in h["clients"])
    assert results["bytes_total"] == sum(h["bytes_up"] + h["bytes_down"] for h in results["history"])
    assert results["payload_bytes"] == len(federated.encode(state))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["score"] == results["score"] and 0.0 <= results["score"] <= 1.0


@needs_glue
def test_the_payload_is_the_trainable_state_gates_and_prompt_included(tiny_model, small_glue, tmp_path, spy):  # noqa: F811
    run_federated(config(tiny_model, small_glue, tmp_path / "run", method="unipelt", rounds=1, clients=2,
                         method_options={"prompt": True}),
                  **QUIET)
    names = set(spy[0][2])
    assert any("gate" in n for n in names) and any("prompt" in n for n in names)
    assert {"classifier.weight", "classifier.bias"} <= names
    assert not any(n.startswith("bert.encoder") for n in names)


@needs_glue
def test_full_fine_tuning_sends_the_whole_model(tiny_model, small_glue, tmp_path):  # noqa: F811
    lora = run_federated(config(tiny_model, small_glue, tmp_path / "lora", rounds=1), **QUIET)
    full = run_federated(config(tiny_model, small_glue, tmp_path / "full", method="full", rounds=1), **QUIET)
    assert full["trainable_params"] > 20 * lora["trainable_params"]
    assert full["payload_bytes"] > full["trainable_params"] * 4  # float32 + header
    assert full["bytes_total"] > 20 * lora["bytes_total"]
    assert (tmp_path / "full" / "model" / "config.json").exists()


@needs_glue
def test_a_failed_client_leaves_its_round_and_the_run_goes_on(tiny_model, small_glue, tmp_path, spy):  # noqa: F811
    def fail(rnd: int, cid: int) -> None:
        if rnd == 1 and cid in picked(1)[:1]:
            raise ConnectionError("client went away")

    def picked(rnd: int) -> list[int]:
        import numpy as np
        return sorted(int(c) for c in np.random.default_rng([1, rnd]).choice(3, 2, replace=False))

    results = run_federated(config(tiny_model, small_glue, tmp_path / "run"), fail=fail, **QUIET)
    first = results["history"][0]
    dropped = picked(1)[0]
    assert first["failures"] == 1
    entry = next(e for e in first["clients"] if e["client"] == dropped)
    assert "client went away" in entry["failed"] and entry["bytes_up"] == 0
    survivors = [(d, n) for rnd, cid, d, n in spy if rnd == 1]
    assert len(survivors) == 1 and results["history"][1]["failures"] == 0
    assert len(results["history"]) == 2 and (tmp_path / "run" / "results.json").exists()


@needs_glue
def test_a_restarted_server_resumes_from_the_last_aggregated_delta(tiny_model, small_glue, tmp_path):  # noqa: F811
    whole = run_federated(config(tiny_model, small_glue, tmp_path / "whole", rounds=3), **QUIET)

    class Killed(BaseException):
        pass

    def die_after_round_2(line: str) -> None:
        if line.startswith("round 2/"):
            raise Killed

    cfg = config(tiny_model, small_glue, tmp_path / "cut", rounds=3)
    with pytest.raises(Killed):
        run_federated(cfg, log=die_after_round_2)
    assert not (tmp_path / "cut" / "results.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run_federated(cfg, **QUIET)
    lines: list[str] = []
    cfg.resume = True
    resumed = run_federated(cfg, log=lines.append)
    assert lines[0].startswith("resuming") and "after round 2" in lines[0]
    assert [h["validation"] for h in resumed["history"]] == [h["validation"] for h in whole["history"]]
    assert resumed["score"] == whole["score"]
    a, b = load_file(tmp_path / "whole" / "delta.safetensors"), load_file(tmp_path / "cut" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_glue
def test_a_client_with_another_base_model_refuses_the_round(tiny_model, small_glue, tmp_path):  # noqa: F811
    server = federated._setup(config(tiny_model, small_glue, tmp_path / "a", seed=1), tmp_path / "a")
    other = federated._setup(config(tiny_model, small_glue, tmp_path / "b", seed=2), tmp_path / "b")
    assert server.trainer.fingerprint != other.trainer.fingerprint  # the seeded pooler differs
    client = PeftClient(0, other.trainer, other.rows(0))
    ins = federated.FitIns(federated.to_parameters(server.trainer.state()),
                           {"round": 1, "seed": 1, "local_epochs": 1.0, "base": server.trainer.fingerprint})
    with pytest.raises(ConfigError, match="same --model and --seed"):
        client.fit(ins)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_glue
def test_server_and_clients_as_processes_compute_what_the_simulation_does(tiny_model, small_glue, tmp_path):  # noqa: F811
    address = f"127.0.0.1:{free_port()}"
    common = ["federated", "--task", "sst2", "--method", "lora", "--model", tiny_model, "--data-dir", str(small_glue),
              "--clients", "2", "--per-round", "2", "--rounds", "2", "--k-shot", "40", "--batch-size", "8"]
    # one intra-op thread as in this process (conftest), so the float reductions run in the same order
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(federated.__file__).parents[1])}
    cli = [sys.executable, "-m", "unipelt.cli"]
    server = subprocess.Popen(cli + common + ["--serve", address, "--out", str(tmp_path / "server")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    clients = [subprocess.Popen(cli + common + ["--connect", address, "--cid", str(c)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in range(2)]
    try:
        out, _ = server.communicate(timeout=240)
        for c in clients:
            assert c.wait(timeout=60) == 0
    finally:
        for p in [server, *clients]:
            p.kill()
    assert server.returncode == 0, out[-2000:]
    assert main(common + ["--out", str(tmp_path / "sim")]) == 0
    a, b = load_file(tmp_path / "server" / "delta.safetensors"), load_file(tmp_path / "sim" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rs, ra = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("server", "sim"))
    assert rs["bytes_total"] == ra["bytes_total"] and rs["score"] == ra["score"]


# ------------------------------------------------------------------------------------------ command line


@needs_glue
def test_cli_runs_reports_and_refuses_bad_input_in_one_line(tiny_model, small_glue, tmp_path, capsys):  # noqa: F811
    args = ["federated", "--task", "sst2", "--model", tiny_model, "--data-dir", str(small_glue), "--clients", "3",
            "--per-round", "2", "--rounds", "2", "--k-shot", "30", "--batch-size", "8"]
    assert main(args + ["--method", "lora", "--alpha", "0.5", "--out", str(tmp_path / "lora")]) == 0
    assert main(args + ["--method", "bitfit", "--out", str(tmp_path / "bitfit")]) == 0
    capsys.readouterr()
    assert main(["federated", "--report", str(tmp_path / "lora"), str(tmp_path / "bitfit"),
                 "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert "lora" in table and "bitfit" in table and "0.5" in table
    assert (tmp_path / "report" / "federated.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "federated.json").read_text())["runs"][0]["method"] == "lora"
    for bad, needle in [(["--per-round", "4"], "--per-round"), (["--connect", "127.0.0.1:1"], "--cid"),
                        (["--alpha", "-1"], "alpha")]:
        capsys.readouterr()
        assert main(args[:9] + ["--per-round", "2", "--rounds", "1", "--k-shot", "30"] + bad
                    + ["--out", str(tmp_path / "bad")]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main(args + ["--method", "lora", "--out", str(tmp_path / "lora")]) == EXIT_BAD_INPUT  # finished: kept


def test_the_benchmark_resumes_from_an_earlier_calls_summary(tmp_path, monkeypatch) -> None:
    """``benchmarks/federated.py --import-runs``: a fresh machine skips the runs an earlier call's summary.json
    holds, and the report keeps them beside the runs finished here."""
    import argparse
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("federated_benchmark", bench / "federated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    earlier = {"device": "NVIDIA H100 80GB HBM3",
               "cells": [{"task": "rte", "alpha": None, "method": "lora", "trainable_params": 7}],
               "runs": [{"task": "rte", "alpha": None, "method": "lora", "seed": 1, "score": 0.5,
                         "bytes_total": 100, "payload_bytes": 10}]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    done = module.imported_runs([tmp_path / "earlier.json"])
    assert done[("rte", None, "lora", 1)]["trainable_params"] == 7  # taken from its cell
    opts = argparse.Namespace(seeds=[1, 2], tasks=["rte"], methods=["lora"], out=tmp_path / "out", model=None,
                              data_dir=tmp_path, clients=2, per_round=1, rounds=1, local_epochs=1.0, sst2_k=0,
                              device="cpu")
    jobs = module.grid(opts, done)
    assert [(j["seed"], j["alpha"]) for j in jobs] == [(1, 0.1), (1, 1.0), (2, None), (2, 0.1), (2, 1.0)]

    finished = tmp_path / "out" / "rte-iid-lora-s2"  # seed 2 finished on this machine
    finished.mkdir(parents=True)
    (finished / "results.json").write_text(json.dumps(
        {"task": "rte", "alpha": None, "method": "lora", "seed": 2, "score": 0.7, "bytes_total": 100,
         "payload_bytes": 10, "trainable_params": 7, "rounds": 1}))
    table = module.summarise(tmp_path / "out", tmp_path / "results", "cpu", done)
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [1, 2]
    # each run names the machine it ran on: the earlier call's GPU, this call's CPU
    assert [r["device"] for r in summary["runs"]] == ["NVIDIA H100 80GB HBM3", "cpu"]
    assert summary["device"] == "NVIDIA H100 80GB HBM3 + cpu"
    (cell,) = summary["cells"]
    assert cell["seeds"] == 2 and cell["score"] == pytest.approx(0.6) and cell["std"] == pytest.approx(0.1414, 1e-3)
    assert "60.0 ±" in table
    (average,) = summary["task_average"]  # one task, both seeds: the cell itself
    assert (average["tasks"], average["seeds"]) == (["rte"], [1, 2])
    assert average["score"] == pytest.approx(0.6) and average["std"] == pytest.approx(0.1414, 1e-3)
