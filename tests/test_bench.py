"""The speed benchmark compares like with like: each case computes its peer's function for equal weights.

For every method that ``peft`` has, the benchmark's unipelt case and peft case are built on the same
random base; peft's delta weights are randomised, copied into ours, and the outputs the benchmark
trains on must agree. A CPU smoke run of the whole benchmark checks its rows and table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import benchmark_script
from unipelt import core
from unipelt.bench import CASE_FILE, benchmark, case, ensure_adapters_env, format_table

peft = pytest.importorskip("peft")

SHAPE_OF = {"bert": "bert-tiny", "llama": "llama-tiny"}


def _peft_module(theirs: torch.nn.Module, path: str) -> torch.nn.Module:
    return theirs.get_submodule(f"base_model.model.{path}")


def _method(ours: torch.nn.Module):
    (method,) = core.deltas(ours).values()
    return method


def copy_peft_weights(method: str, theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Put peft's (randomised) delta into our method object of the same configuration."""
    mine = _method(ours)
    with torch.no_grad():
        if method == "lora":
            for key, proj in mine.sites.items():
                layer = _peft_module(theirs, proj.path)
                mine.pairs[key].A.weight.copy_(layer.lora_A["default"].weight)
                mine.pairs[key].B.weight.copy_(layer.lora_B["default"].weight)
        elif method == "ia3":
            for key, proj in {**mine.outputs, **mine.inputs}.items():
                mine.scales[key].copy_(_peft_module(theirs, proj.path).ia3_l["default"].reshape(-1))
        elif method == "ln":
            for key in mine.norms:
                copy = _peft_module(theirs, key.replace("__", ".")).ln_tuning_layers["default"]
                mine.gains[key].copy_(copy.weight)  # both train the norms' own gains and biases
                if key in mine.biases:
                    mine.biases[key].copy_(copy.bias)
        elif method == "prefix":
            _copy_prefix(mine, theirs.prompt_encoder["default"].embedding.weight)
        elif method == "prefix_mlp":
            encoder = theirs.prompt_encoder["default"]
            mine.embedding.copy_(encoder.embedding.weight)
            mine.mlp[0].load_state_dict(encoder.transform[0].state_dict())
            mine.mlp[2].load_state_dict(encoder.transform[2].state_dict())
            assert mine.start is None  # no fixed word-like start unless init="words"
        elif method == "prompt":
            mine.embedding.copy_(theirs.prompt_encoder["default"].embedding.weight)
        else:
            raise AssertionError(method)


PEFT_METHODS = [m for m, spec in case.METHODS.items() if "peft" in spec and "unipelt" in spec]


# With grouped-query attention (the LLaMA shape) peft's prefix MLP embeds in the key/value width and ours in
# the hidden size: the same prefixes, differently parametrised, so no weight copy exists for that pair.
PEFT_PAIRS = [(m, f) for m in PEFT_METHODS for f in ("bert", "llama") if (m, f) != ("prefix_mlp", "llama")]


@pytest.mark.parametrize(("method", "family"), PEFT_PAIRS)
def test_unipelt_case_computes_the_peft_case_function(method: str, family: str) -> None:
    shape = case.SHAPES[SHAPE_OF[family]]
    theirs = case.attach("peft", method, case.build_base(shape), family)
    ours = case.attach("unipelt", method, case.build_base(shape), family)
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    assert trainable
    torch.manual_seed(3)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.2)  # away from identity, so that a misplaced delta shows
    copy_peft_weights(method, theirs, ours)
    ids = torch.randint(5, shape["config"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row too
    theirs.eval()
    ours.eval()
    # peft's prefix passes as a cache of past tokens, which moves the real tokens' positions on by its
    # length; ours leaves positions alone (the cost is the same), so here ours gets the moved positions
    shift = case.METHODS[method]["peft"][1]["num_virtual_tokens"] if method.startswith("prefix") else 0
    positions = {"position_ids": torch.arange(shift, shift + ids.shape[1]).expand_as(ids)} if shift else {}
    with torch.no_grad():
        a = case.hidden(theirs(input_ids=ids, attention_mask=mask), case.virtual_tokens("peft", method))
        b = case.hidden(ours(input_ids=ids, attention_mask=mask, **positions))
        bare = case.hidden(case.build_base(shape)(input_ids=ids, attention_mask=mask))
    assert a.shape == b.shape == bare.shape
    assert (a - bare).abs().max() > 1e-3  # the delta changes the function
    keep = mask.bool()
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-4, atol=1e-5)
    # and the configurations are the same size
    ours_count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    theirs_count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours_count == theirs_count


def _copy_prefix(mine, flat: torch.Tensor) -> None:
    """peft and adapters lay a flat prefix out as [k | v] per layer, layers in order (as ours)."""
    assert flat.shape == mine.table.shape
    mine.table.copy_(flat)


def _adapters_site(key: str) -> str:
    """adapters' module of our adapter site on a BertModel: ``layers0_ffn`` -> ``encoder.layer.0.output.adapters.bench``
    and ``layers0_self_attn`` -> ``encoder.layer.0.attention.output.adapters.bench``."""
    layer = int(key.split("_")[0].removeprefix("layers"))
    return f"encoder.layer.{layer}.{'output' if key.endswith('_ffn') else 'attention.output'}.adapters.bench"


def copy_adapters_weights(method: str, delta: dict[str, torch.Tensor], ours: torch.nn.Module) -> None:
    """Put the ``adapters`` library's delta (by parameter name) into our method of the same configuration."""
    used = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return delta[name]

    with torch.no_grad():
        if method == "mam":  # prefix (with its MLP) + scaled parallel adapter: each part as alone
            parts = core.deltas(ours)
            _copy_adapters_part("prefix_mlp", parts["prefix"], delta, take)
            _copy_adapters_part("parallel", parts["adapter"], delta, take)
        else:
            _copy_adapters_part(method, _method(ours), delta, take)
    assert used == set(delta), f"adapters parameters left unmapped: {sorted(set(delta) - used)[:4]}"


def _copy_adapters_part(method: str, mine, delta: dict[str, torch.Tensor], take) -> None:
    if method == "lora":
        for key, proj in mine.sites.items():
            mine.pairs[key].A.weight.copy_(take(f"{proj.path}.loras.bench.lora_A"))
            mine.pairs[key].B.weight.copy_(take(f"{proj.path}.loras.bench.lora_B"))
    elif method in ("houlsby", "pfeiffer", "parallel"):
        for key, bottleneck in mine.adapters.items():
            where = _adapters_site(key)
            bottleneck.down.weight.copy_(take(f"{where}.adapter_down.0.weight"))
            bottleneck.down.bias.copy_(take(f"{where}.adapter_down.0.bias"))
            bottleneck.up.weight.copy_(take(f"{where}.adapter_up.weight"))
            bottleneck.up.bias.copy_(take(f"{where}.adapter_up.bias"))
    elif method == "compacter":
        # adapters: y = x H + b, H = sum_i rule_i (x) (W_left_i W_right_i), (in, out); ours: y = x W^T + b,
        # W = sum_i A_i (x) (s_i t_i), (out, in). W^T = sum_i A_i^T (x) (s_i t_i)^T, so A_i = rule_i^T,
        # s_i = W_right_i^T and t_i = W_left_i^T
        mine.rules.copy_(take("shared_parameters.bench.phm_rule").transpose(-1, -2))
        for key in mine.sites:
            where = _adapters_site(key)
            for part, theirs in (("down", "adapter_down.0"), ("up", "adapter_up")):
                layer = getattr(mine.adapters[key], part)
                layer.s.copy_(take(f"{where}.{theirs}.W_right").transpose(-1, -2))
                layer.t.copy_(take(f"{where}.{theirs}.W_left").transpose(-1, -2))
                layer.bias.copy_(take(f"{where}.{theirs}.b"))
    elif method in ("prefix", "prefix_mlp"):
        (pool,) = {n.split(".self_prefix.")[0] for n in delta if ".self_prefix." in n}
        stem = f"{pool}.self_prefix"
        if method == "prefix":
            flat = take(f"{stem}.control_trans")
            _copy_prefix(mine, flat.reshape(mine.config.length, -1))  # adapters keeps it as one vector
        else:
            mine.embedding.copy_(take(f"{stem}.wte.weight"))
            for i in (0, 2):
                mine.mlp[i].weight.copy_(take(f"{stem}.control_trans.{i}.weight"))
                mine.mlp[i].bias.copy_(take(f"{stem}.control_trans.{i}.bias"))
    else:
        raise AssertionError(method)


# Methods whose adapters configuration computes the same function as ours (tests/test_adapters_equivalence.py checks
# them, and UniPELT's, on their own configurations, gradients included); the others differ: its IA3 scales W_1's
# output before the activation (ours, as the paper, after it), its prompt joins the embedding layer's output (ours
# joins the input embeddings unless join="embeddings").
ADAPTERS_SAME_FUNCTION = ["lora", "houlsby", "pfeiffer", "parallel", "prefix", "prefix_mlp", "compacter", "mam"]
# Compacter's PHM layers need sizes divisible by n = 4: bert-tiny's bottleneck (32 / 32) is 1
ADAPTERS_SHAPE = {"compacter": "bert-small"}


@pytest.fixture(scope="module")
def adapters_env() -> Path:
    """``adapters`` and its pinned transformers, installed once into the (git-ignored) .bench folder."""
    target = Path(os.environ.get("UNIPELT_ADAPTERS_ENV", Path(__file__).resolve().parents[1] / ".bench"
                                 / "adapters-env"))
    env = ensure_adapters_env(target, log=lambda s: None)
    assert env is not None, "pip could not install adapters==1.3.0 with transformers==4.57.6"
    return env


@pytest.mark.parametrize("method", ADAPTERS_SAME_FUNCTION)
def test_unipelt_case_computes_the_adapters_case_function(method: str, adapters_env: Path, tmp_path) -> None:
    file = tmp_path / f"{method}.pt"
    shape_name = ADAPTERS_SHAPE.get(method, "bert-tiny")
    spec = {"peer": "adapters", "method": method, "shape": shape_name, "dump": str(file)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(adapters_env), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(CASE_FILE), json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    dumped = torch.load(file, weights_only=True)
    shape = case.SHAPES[shape_name]
    base = case.build_base(shape)
    base.load_state_dict(dumped["base"])  # the peer's base weights, whatever its transformers initialised
    ours = case.attach("unipelt", method, base, "bert")
    copy_adapters_weights(method, dumped["delta"], ours)
    bare = case.build_base(shape).eval()
    bare.load_state_dict(dumped["base"])
    ours.eval()
    inputs = {"input_ids": dumped["input_ids"], "attention_mask": dumped["attention_mask"]}
    with torch.no_grad():
        a, b, plain = dumped["output"], case.hidden(ours(**inputs)), case.hidden(bare(**inputs))
    keep = dumped["attention_mask"].bool()
    assert a.shape == b.shape == plain.shape
    assert (a - plain).abs().max() > 1e-3  # the peer's delta changes the function
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(v.numel() for v in dumped["delta"].values())


def test_floor_case_has_no_trainable_weights_but_gradients_reach_the_embeddings() -> None:
    shape = case.SHAPES["bert-tiny"]
    model = case.attach("floor", "-", case.build_base(shape), "bert")
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(5, 1000, (2, 8))
    inputs = case.step_inputs("floor", model, ids)
    out = case.hidden(model(**inputs))
    assert out.requires_grad
    out.square().mean().backward()
    assert inputs["inputs_embeds"].grad.abs().sum() > 0
    # the same function as the model called with the ids (the embeddings are looked up outside, that is all)
    torch.testing.assert_close(out, case.hidden(model(input_ids=ids, attention_mask=torch.ones_like(ids))))
    assert case.step_inputs("unipelt", model, ids).keys() == {"input_ids", "attention_mask"}


def test_the_step_loss_has_real_gradients_on_a_layernorm_model() -> None:
    """BERT's final states leave a LayerNorm with gain 1 and bias 0: their mean square, the benchmark's
    first loss, is constant there (gradients of order 1e-12 in float64). The loss along a fixed random
    direction is not, and the direction is the same for every case of a shape."""
    shape = case.SHAPES["bert-tiny"]
    model = case.attach("unipelt", "lora", case.build_base(shape), "bert").double()
    inputs = case.step_inputs("unipelt", model, case.random_batch(shape))
    direction = case.loss_direction(model, inputs)
    assert torch.equal(direction, case.loss_direction(case.build_base(shape), inputs))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # LoRA's B starts at zero
    (case.hidden(model(**inputs)) * direction).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and min(g.norm().item() for g in grads) > 1e-6


def test_floor_compiles_as_one_graph() -> None:
    """A graph break in the floor would make the compiled floor slower than the model it stands for."""
    shape = case.SHAPES["bert-tiny"]
    model = case.attach("floor", "-", case.build_base(shape), "bert")
    explained = torch._dynamo.explain(model)(**case.step_inputs("floor", model, torch.randint(5, 1000, (2, 8))))
    assert explained.graph_break_count == 0


def test_vision_shape_runs_the_vit_methods_and_skips_text_only_ones() -> None:
    """vit-tiny: VPT (shallow, deep) and KAdaptation time on a ViT fed pixel values; ATTEMPT (text prompts)
    is left out on a ViT and VPT on BERT, each named in the log."""
    lines: list[str] = []
    result = benchmark("vit-tiny", ["vpt", "vpt_deep", "kadaptation", "attempt"], peers=(), device="cpu", steps=1,
                       warmup=1, threads=1, full=False, log=lines.append)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"vpt", "vpt_deep", "kadaptation"} and any("attempt" in line for line in lines)
    d, layers, length = 32, 2, 10
    assert rows["vpt"]["ours_trainable"] == length * d and rows["vpt_deep"]["ours_trainable"] == layers * length * d
    assert all(r["ours_ms"] > 0 and r["ours_error"] is None for r in rows.values())
    assert result["floor"]["train_ms"] > 0
    text = benchmark("bert-tiny", ["attempt", "poly_mu", "vpt"], peers=(), device="cpu", steps=1, warmup=1,
                     threads=1, full=False, log=lambda line: None)
    assert [r["method"] for r in text["rows"]] == ["attempt", "poly_mu"]
    assert all(r["ours_ms"] > 0 and r["ours_error"] is None for r in text["rows"])


def test_the_floor_takes_pixel_values_as_a_leaf_on_a_vit() -> None:
    model = case.attach("floor", "-", case.build_base(case.SHAPES["vit-tiny"]), "vit")
    pixels = torch.randn(2, 3, 32, 32)
    inputs = case.step_inputs("floor", model, pixels)
    case.hidden(model(**inputs)).square().mean().backward()
    assert inputs["pixel_values"].grad.abs().sum() > 0 and not pixels.requires_grad
    assert case.step_inputs("unipelt", model, pixels) == {"pixel_values": pixels}


def test_benchmark_smoke_run_on_cpu(adapters_env: Path) -> None:
    """The whole benchmark on the tiny shape, a few steps per case, both peers (no timing claims)."""
    result = benchmark("bert-tiny", ["lora", "ln", "ia3"], peers=("peft", "adapters"), device="cpu", steps=2,
                       warmup=1, adapters_env=adapters_env, threads=1, log=lambda s: None)
    rows = {(r["method"], r["peer"]): r for r in result["rows"]}
    assert set(rows) == {("lora", "peft"), ("lora", "adapters"), ("ln", "peft"), ("ia3", "peft"), ("ia3", "adapters")}
    assert rows[("lora", "adapters")]["peer_error"] is None and rows[("lora", "adapters")]["peer_ms"] > 0
    assert rows[("lora", "adapters")]["peer_trainable"] == rows[("lora", "adapters")]["ours_trainable"]
    for r in rows.values():
        assert r["ours_error"] is None and r["ours_ms"] > 0 and r["ratio_vs_floor"] > 0 and r["ours_ops"] > 0
    lora = rows[("lora", "peft")]
    assert lora["peer_error"] is None and lora["ours_trainable"] == lora["peer_trainable"]
    assert lora["ratio_vs_peer"] == pytest.approx(lora["ours_ms"] / lora["peer_ms"])
    assert lora["ours_merged_infer_ms"] is not None and lora["peer_merged_infer_ms"] is not None
    assert rows[("ln", "peft")]["ours_merged_infer_ms"] is not None
    table = format_table(result)
    assert "| lora | peft |" in table and "| lora | adapters |" in table
    json.dumps(result)  # the JSON the benchmark writes
    for key in ("method", "peer", "device", "ours_ms", "peer_ms", "floor_ms", "ratio_vs_peer", "ratio_vs_floor"):
        assert key in lora


def test_unipelt_bench_command(tmp_path, capsys) -> None:
    from unipelt.cli import main

    out = tmp_path / "speed.json"
    assert main(["bench", "--shape", "bert-tiny", "--methods", "lora", "--peers", "--steps", "2", "--warmup", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"][0]["method"] == "lora" and result["rows"][0]["peer"] is None
    assert out.with_suffix(".md").exists()
    assert "| lora |" in capsys.readouterr().out
    # every case was also appended as it finished (what a run cut short by a time limit keeps)
    cases = [json.loads(line) for line in out.with_suffix(".cases.jsonl").read_text().splitlines()]
    assert [(c["peer"], c["method"]) for c in cases] == [("floor", "-"), ("unipelt", "lora"), ("full", "-")]
    assert cases[1]["train_ms"] == result["rows"][0]["ours_ms"]
    # --from-cases turns such a file back into the same rows, running nothing; a cut run lacks full fine-tuning
    cut = out.with_suffix(".cases.jsonl")
    cut.write_text("\n".join(cut.read_text().splitlines()[:2]) + "\n")
    again = tmp_path / "again.json"
    assert main(["bench", "--from-cases", str(cut), "--device-name", "test CPU", "--out", str(again)]) == 0
    rebuilt = json.loads(again.read_text())
    assert rebuilt["rows"][0]["ours_ms"] == result["rows"][0]["ours_ms"]
    assert rebuilt["floor"]["train_ms"] == result["floor"]["train_ms"] and rebuilt["full"] == {"error": "not run"}
    assert rebuilt["device"] == "test CPU" and rebuilt["partial"] is True


def test_a_compiled_case_trains_through_torch_compile() -> None:
    """--compile: the case's model runs through torch.compile; it reports training only (counting ops or
    timing inference would each compile again), with the same trainable weights as the eager case."""
    spec = {"peer": "unipelt", "method": "lora", "shape": "bert-tiny", "device": "cpu", "steps": 1, "warmup": 1}
    eager = case.measure(spec)
    fast = case.measure({**spec, "compile": "default"})
    assert fast["compile"] == "default" and fast["train_ms"] > 0
    assert fast["ops_per_step"] is None and fast["infer_ms"] is None
    assert fast["trainable"] == eager["trainable"]
    assert abs(fast["loss"] - eager["loss"]) < 1e-4  # same weights, same batch, after the same three steps
    # what compiling cost, and whether it came from the on-disk caches (what --prewarm fills)
    assert fast["first_step_s"] > 0 and any(k.startswith("inductor.fxgraph_cache") for k in fast["compile_cache"])


def test_fused_adamw_trains_the_same_weights_as_foreach() -> None:
    """--optimizer fused: the same update (same loss after the same steps), recorded in the case's result."""
    spec = {"peer": "unipelt", "method": "unipelt", "shape": "bert-tiny", "device": "cpu", "steps": 2, "warmup": 1}
    foreach = case.measure(spec)
    fused = case.measure({**spec, "optimizer": "fused"})
    assert foreach["optimizer"] == "foreach" and fused["optimizer"] == "fused"
    assert fused["trainable"] == foreach["trainable"]
    assert abs(fused["loss"] - foreach["loss"]) < 1e-5


def test_prewarm_runs_every_case_once_untimed_before_the_timed_ones(monkeypatch) -> None:
    """--prewarm N: each case (floor and full fine-tuning too) runs one untimed compiled step first, in
    parallel; a case asked to run untimed trains one step and measures nothing."""
    import unipelt.bench as bench

    seen = []

    def fake_run_case(spec, pythonpath=None, timeout=1800):
        seen.append(spec)
        return {"untimed": True}

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    bench._prewarm([("floor", "-"), ("unipelt", "lora"), ("full", "-")], 2,
                   {"shape": "bert-tiny", "device": "cpu", "compile": "default"}, None, log=lambda line: None)
    assert sorted((s["peer"], s["method"]) for s in seen) == [("floor", "-"), ("full", "-"), ("unipelt", "lora")]
    assert all(s["untimed"] and s["compile"] == "default" and s["steps"] == 1 for s in seen)
    out = case.measure({"peer": "unipelt", "method": "lora", "shape": "bert-tiny", "device": "cpu", "steps": 1,
                        "warmup": 1, "untimed": True})
    assert out == {"peer": "unipelt", "method": "lora", "untimed": True}


def test_a_fully_merged_model_runs_the_bare_models_code_and_can_take_new_deltas() -> None:
    """After merging everything no unipelt hook or forward wrapper is left (merged inference = bare
    inference); attaching again puts the model-level call wrapper back."""
    import unipelt

    shape = case.SHAPES["bert-tiny"]
    model = case.build_base(shape).eval()
    probe = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        bare_ops = case.count_ops(lambda: model(input_ids=probe))
    unipelt.attach(model, {"method": "lora", "r": 2})
    with torch.no_grad():
        for pair in core.deltas(model)["lora"].pairs.values():
            pair.B.weight.normal_()
    ids = torch.randint(5, 1000, (2, 6))
    with torch.no_grad():
        before = case.hidden(model(input_ids=ids))
    unipelt.merge(model)
    assert not model._forward_pre_hooks and not model._forward_hooks and "forward" not in vars(model)
    with torch.no_grad():
        torch.testing.assert_close(case.hidden(model(input_ids=ids)), before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert case.count_ops(lambda: model(input_ids=probe)) == bare_ops
    unipelt.attach(model, {"method": "prompt", "length": 3})  # needs the model-level call rewrite again
    assert "forward" in vars(model)
    with torch.no_grad():
        assert case.hidden(model(input_ids=ids)).shape == before.shape


def test_merged_inference_benchmark_times_bare_and_merged_and_checks_the_function() -> None:
    """benchmarks/merged_inference.py on the CPU (smoke): merged rows compute the unmerged function."""
    module = benchmark_script("merged_inference")
    result = module.compare("bert-tiny", ["lora", "prefix"], "cpu", steps=1, rounds=1)
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["prefix"] == {"method": "prefix", "error": "not mergeable"}
    assert rows["lora"]["bare_ms"] > 0 and rows["lora"]["merged_ms"] > 0
    assert rows["lora"]["max_abs_diff_vs_unmerged"] < 1e-5


def test_sdpa_backends_benchmark_needs_a_gpu_and_tables_each_shape_by_backend(monkeypatch, tmp_path, capsys) -> None:
    """benchmarks/sdpa_backends.py times CUDA kernels only: on the CPU it says so; its table puts each
    (queries, keys) shape on a row, one cell per backend, and a backend that refused the shape as '-'."""
    module = benchmark_script("sdpa_backends")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a GPU"):
        module.main(["--shapes", "128x138"])
    rows = [{"queries": 128, "keys": 138, "backend": b, "us": us} for b, us in
            [("default", 68.2), ("cudnn", 68.0), ("flash", 90.7)]]
    rows.append({"queries": 128, "keys": 138, "backend": "efficient", "error": "no kernel"})
    assert module.table(rows).splitlines()[-1] == "| 128 | 138 | 68.2 | 68.0 | 90.7 | - |"
    # the GPU micro-benchmarks' report: the table under the device's name, the rows with it in the JSON
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    out = tmp_path / "sdpa.json"
    case.report_gpu_rows(rows, module.table(rows), str(out))
    assert capsys.readouterr().out.startswith(f"NVIDIA H200, torch {torch.__version__}\n\n| queries |")
    assert json.loads(out.read_text()) == {"device": "NVIDIA H200", "torch": torch.__version__, "rows": rows}


def test_attention_check_compares_implementations_and_catches_one_that_differs(monkeypatch) -> None:
    """benchmarks/attention_check.py on the CPU (smoke): UniPELT on a tiny LLaMA trains the same function with
    the same gradients under SDPA and eager attention; an eager gated share made 1% too large shows."""
    import unipelt.attention

    module = benchmark_script("attention_check")
    rows = module.check("llama-tiny", ["unipelt"], ["sdpa", "eager"], "cpu", False, torch.float64)
    eager = rows[1]
    assert (eager["attention"], eager["tensors"]) == ("eager", rows[0]["tensors"]) and eager["tensors"] > 10
    # LLaMA's eager attention takes its softmax in float32: differences of float32's size, not float64's
    assert eager["hidden_max_diff"] < 1e-5 and eager["gradient_rel_norm_diff"] < 1e-3
    share = unipelt.attention._share_from_weights
    monkeypatch.setattr(unipelt.attention, "_share_from_weights",
                        lambda *a: None if share(*a) is None else share(*a) * 1.01)  # None: SDPA's second call
    broken = module.check("llama-tiny", ["unipelt"], ["sdpa", "eager"], "cpu", False, torch.float64)[1]
    assert broken["hidden_max_diff"] > 1e-4 and broken["gradient_rel_norm_diff"] > 1e-3
    assert "| unipelt | eager | eager |" in module.table(rows, "sdpa")


def test_attention_check_gradients_are_not_rounding_noise_on_a_layernorm_model() -> None:
    """BERT's states leave a LayerNorm (gain 1, bias 0, eps 1e-12): their mean square is constant, so a check
    with that loss compared rounding noise (8e-4 apart in float64 between SDPA and eager attention). The
    check's loss is a fixed random direction: the same two implementations agree to float64's precision."""
    module = benchmark_script("attention_check")
    rows = module.check("bert-tiny", ["prefix", "unipelt"], ["sdpa", "eager"], "cpu", False, torch.float64)
    for row in rows[1::2]:
        assert row["attention"] == "eager" and row["tensors"] > 0
        assert row["gradient_rel_norm_diff"] < 1e-12 and row["gradient_max_rel_diff"] < 1e-12, row


def test_back_to_back_timing_takes_one_event_between_calls_and_synchronises_only_at_the_ends(monkeypatch) -> None:
    """On a GPU each case also times its steps back to back, as a training loop runs them: each step's time
    is the stream's time between the events around it, with no synchronisation in between."""
    clock = [0.0]
    syncs = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False):
            self.at = None

        def record(self) -> None:
            self.at = clock[0]

        def elapsed_time(self, later: FakeEvent) -> float:
            return later.at - self.at

    host_clock = [0.0]  # seconds, as time.perf_counter
    monkeypatch.setattr(case.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(case.torch.cuda, "synchronize", lambda: syncs.append(clock[0]))
    monkeypatch.setattr(case.time, "perf_counter", lambda: host_clock[0])
    durations = iter([1.0] * 2 + [3.0, 4.0, 5.0])  # two warm-up calls, then three timed ones
    host_durations = iter([0.5] * 2 + [2.0, 6.0, 1.0])  # the second timed step is host-bound

    def step() -> None:
        clock[0] += next(durations)
        host_clock[0] += next(host_durations) / 1e3

    host: list[float] = []
    assert case.timed(step, 3, 2, cuda=True, back_to_back=True, host_ms=host) == [3.0, 4.0, 5.0]
    assert syncs == [2.0, 14.0]  # before the first timed step and after the last, never between
    assert host == pytest.approx([2.0, 6.0, 1.0])  # each step's own host time, the warm-up's left out


def _from_written_cases(tmp_path: Path, cases: list[dict]) -> dict:
    """The benchmark's result rebuilt from these cases, written as a run's cases file."""
    from unipelt.bench import from_cases

    path = tmp_path / "run.cases.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return from_cases(path, "test GPU")


def test_back_to_back_figures_reach_the_rows_and_the_table(tmp_path) -> None:
    common = {"shape": "bert-tiny", "peak_mb": 1.0, "infer_ms": None, "trainable": 10}
    result = _from_written_cases(tmp_path, [
        {"peer": "floor", "method": "-", "train_ms": 10.0, "back_to_back_ms": 8.0, "host_ms": 3.0, **common},
        {"peer": "unipelt", "method": "lora", "train_ms": 12.0, "back_to_back_ms": 9.0, "host_ms": 8.5, **common},
        {"peer": "peft", "method": "lora", "train_ms": 13.0, "back_to_back_ms": 10.0, "host_ms": 4.0, **common}])
    (row,) = result["rows"]
    assert row["ratio_vs_floor"] == pytest.approx(1.2)  # synchronised steps, as before
    assert row["ratio_vs_floor_back_to_back"] == pytest.approx(9 / 8)
    assert row["ratio_vs_peer_back_to_back"] == pytest.approx(0.9)
    assert (row["ours_host_ms"], row["peer_host_ms"], row["floor_host_ms"]) == (8.5, 4.0, 3.0)
    table = format_table(result)
    assert "floor 8.00 ms/step, its host 3.00 ms/step" in table
    assert "| lora | peft | 9.00 | 10.00 | 1.12 | 0.90 | 8.50 / 4.00 |" in table
    assert "requested" not in table  # no requested-bytes peak (CPU cases): no such table


def test_methods_that_lengthen_the_sequence_read_against_the_floor_at_that_length(tmp_path) -> None:
    """prompt tuning's 20 tokens: its rows (against each peer) also carry the floor timed 20 positions longer."""
    common = {"shape": "bert-tiny", "peak_mb": 1.0, "infer_ms": None, "trainable": 10}
    result = _from_written_cases(tmp_path, [
        {"peer": "floor", "method": "-", "train_ms": 10.0, "back_to_back_ms": 8.0, "gpu_busy_ms": 7.0, **common},
        {"peer": "floor", "method": "+20", "train_ms": 12.5, "back_to_back_ms": 10.0, "gpu_busy_ms": 8.0, **common},
        {"peer": "unipelt", "method": "prompt", "train_ms": 13.0, "back_to_back_ms": 11.0, "gpu_busy_ms": 8.8,
         **common},
        {"peer": "peft", "method": "prompt", "train_ms": 13.5, "back_to_back_ms": 11.0, **common},
        {"peer": "unipelt", "method": "lora", "train_ms": 11.0, "back_to_back_ms": 9.0, **common}])
    rows = {(r["method"], r["peer"]): r for r in result["rows"]}
    assert set(rows) == {("prompt", "peft"), ("lora", None)}  # the longer floor is no method's row
    prompt = rows[("prompt", "peft")]
    assert prompt["ratio_vs_floor"] == pytest.approx(1.3) and prompt["tokens_added"] == 20
    assert prompt["ratio_vs_longer_floor"] == pytest.approx(13 / 12.5)
    assert prompt["ratio_vs_longer_floor_back_to_back"] == pytest.approx(1.1)
    assert prompt["ratio_vs_longer_floor_gpu_busy"] == pytest.approx(1.1)
    assert "tokens_added" not in rows[("lora", None)]
    assert result["longer_floors"]["20"]["train_ms"] == 12.5
    table = format_table(result)
    assert "| prompt | 20 | 13.00 | 10.00 (1.30) | 12.50 (1.04) | 1.38 / 1.10 | 1.26 / 1.10 |" in table
    assert "| lora | 20 |" not in table


def test_a_run_times_the_floor_at_each_longer_sequence_its_methods_make(monkeypatch) -> None:
    from unipelt import bench

    seen = []

    def fake(spec, pythonpath=None, timeout=1800):
        seen.append((spec["peer"], spec["method"]))
        return {"train_ms": 1.0, "peak_mb": 1.0, "infer_ms": None, "trainable": 0}

    monkeypatch.setattr(bench, "run_case", fake)
    bench.benchmark("bert-tiny", ["lora", "prompt", "attempt"], peers=(), steps=1, warmup=1, full=False,
                    log=lambda s: None)
    assert seen == [("floor", "-"), ("floor", "+20"), ("unipelt", "lora"), ("unipelt", "prompt"),
                    ("unipelt", "attempt")]
    assert bench.longer_floors(["lora"], "bert") == [] and bench.longer_floors(["prompt"], "vit") == []


def test_the_longer_floor_case_runs_the_frozen_model_at_that_length() -> None:
    out = case.measure({"peer": "floor", "method": "+4", "shape": "bert-tiny", "device": "cpu", "steps": 1,
                        "warmup": 1, "threads": 1})
    assert out["seq"] == case.SHAPES["bert-tiny"]["seq"] + 4 and out["trainable"] == 0
    assert case.measure({"peer": "floor", "method": "-", "shape": "bert-tiny", "device": "cpu", "steps": 1,
                         "warmup": 1, "threads": 1})["seq"] == case.SHAPES["bert-tiny"]["seq"]


def test_the_diagnostic_cases_are_their_compositions_parts() -> None:
    """The row that prices UniPELT's gates has the same parts, only the gates' weights missing (per layer: the
    adapter's, the prefix's, and LoRA's on q and v, each a d -> 1 linear map); MAM's parts add up to MAM."""
    shape = case.SHAPES["bert-tiny"]
    counts = {}
    for method in ("unipelt", "unipelt_ungated", "mam", "mam_prefix", "parallel"):
        model = case.attach("unipelt", method, case.build_base(shape), "bert")
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, layers = shape["config"]["hidden_size"], shape["config"]["num_hidden_layers"]
    assert counts["unipelt"] - counts["unipelt_ungated"] == layers * 4 * (d + 1)
    # MAM's parts apart: its prefix alone, and its adapter alone, the parallel adapter's row
    assert counts["mam"] == counts["mam_prefix"] + counts["parallel"]


def test_graphs_run_without_cuda_graphs_are_heard_and_named_in_the_table(tmp_path) -> None:
    """Under reduce-overhead, a graph Inductor runs without CUDA graphs launches each kernel from the host:
    the case hears torch's reason, and the table names the case and the reason."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    heard = case.watch_cudagraph_skips()
    try:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    finally:
        from torch._inductor import cudagraph_utils

        cudagraph_utils.cudagraphs_log.removeHandler(heard)
    assert heard.messages == ["skipping cudagraphs due to mutated inputs (1 instances)"]
    common = {"shape": "bert-tiny", "peak_mb": 1.0, "infer_ms": None, "trainable": 10}
    result = _from_written_cases(tmp_path, [
        {"peer": "floor", "method": "-", "train_ms": 10.0, "cudagraph_skip_reasons": [], **common},
        {"peer": "unipelt", "method": "lora", "train_ms": 12.0,
         "cudagraph_skip_reasons": ["skipping cudagraphs due to mutated inputs"], **common},
        {"peer": "peft", "method": "lora", "train_ms": 12.5, "cudagraph_skip_reasons": ["due to a CPU tensor"],
         **common},
        {"peer": "adapters", "method": "lora", "train_ms": 12.5, "cudagraph_skip_reasons": [], **common},
        {"peer": "unipelt", "method": "ia3", "train_ms": 11.0, "cudagraph_skip_reasons": [], **common}])
    rows = {(r["method"], r["peer"]): r for r in result["rows"]}
    assert rows[("lora", "peft")]["ours_cudagraph_skips"] == ["skipping cudagraphs due to mutated inputs"]
    table = format_table(result)
    # each case once, though ours stands on lora's rows against both peers
    assert table.endswith("Graphs run without CUDA graphs: lora (ours): skipping cudagraphs due to mutated "
                          "inputs; lora (peft): due to a CPU tensor")
    assert "ia3 (ours)" not in table and "floor (floor)" not in table and "(adapters)" not in table


def test_the_requested_bytes_peak_reaches_the_rows_and_the_table(tmp_path) -> None:
    """On a GPU each case also reports the peak of the tensors' own bytes beside max_memory_allocated,
    which counts the allocator's rounded blocks (the two differ by a few MB between equal programs)."""
    common = {"shape": "bert-tiny", "infer_ms": None, "trainable": 10, "train_ms": 10.0}
    result = _from_written_cases(tmp_path, [
        {"peer": "floor", "method": "-", "peak_mb": 100.0, "peak_requested_mb": 90.5, **common},
        {"peer": "unipelt", "method": "lora", "peak_mb": 112.0, "peak_requested_mb": 101.25, **common},
        {"peer": "adapters", "method": "lora", "peak_mb": 110.0, "peak_requested_mb": 101.5, **common}])
    (row,) = result["rows"]
    assert (row["ours_peak_requested_mb"], row["peer_peak_requested_mb"]) == (101.25, 101.5)
    table = format_table(result)
    assert "floor 100.00 / 90.50" in table and "| lora | adapters | 112.00 / 110.00 | 101.25 / 101.50 |" in table


def test_a_case_records_the_allocator_settings_it_ran_under(tmp_path, monkeypatch) -> None:
    """PYTORCH_CUDA_ALLOC_CONF changes how max_memory_allocated counts (expandable segments split every
    cached block): each case records the value it inherited, and the table's first line names it."""
    spec = {"peer": "floor", "method": "-", "shape": "bert-tiny", "device": "cpu", "steps": 1, "warmup": 0}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    floor = case.measure(spec)
    assert floor["alloc_conf"] == "expandable_segments:True"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    lora = case.measure({**spec, "peer": "unipelt", "method": "lora"})
    assert lora["alloc_conf"] is None
    result = _from_written_cases(tmp_path, [floor, lora])
    assert "; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in format_table(result).splitlines()[0]
    assert "ALLOC_CONF" not in format_table(_from_written_cases(tmp_path, [lora | {"peer": "floor", "method": "-"}]))


def test_a_case_can_compile_its_whole_training_step() -> None:
    """--compile-scope step: forward, backward (compiled autograd) and the optimizer run compiled; the same
    training as the eager case."""
    spec = {"peer": "unipelt", "method": "lora", "shape": "bert-tiny", "device": "cpu", "steps": 1, "warmup": 1}
    eager = case.measure(spec)
    try:
        whole = case.measure({**spec, "compile": "default", "compile_scope": "step"})
    finally:  # a case runs in a process of its own, which keeps compiled autograd on; this test's does not
        torch._dynamo.config.compiled_autograd = False
        torch._dynamo.reset()
    assert whole["compile_scope"] == "step" and whole["train_ms"] > 0
    assert abs(whole["loss"] - eager["loss"]) < 1e-4
    assert sum(whole["compile_cache"].values()) > 0  # it went through the compiler


def test_inductor_options_reach_every_case_and_the_result(monkeypatch) -> None:
    """--inductor NAME=VALUE: every case (the floor and the prewarm's untimed ones too) gets the options,
    and the result and its table say which were set; --top-kernels N reaches every timed case."""
    import unipelt.bench as bench

    seen = []

    def fake_run_case(spec, pythonpath=None, timeout=1800):
        seen.append(spec)
        return {"train_ms": 1.0, "peak_mb": 1.0, "infer_ms": None, "trainable": 0}

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    options = bench.parse_options(["combo_kernels=true", "triton.cudagraph_trees=false"])
    assert options == {"combo_kernels": True, "triton.cudagraph_trees": False}
    result = benchmark("bert-tiny", ["lora"], (), "cpu", steps=1, warmup=1, compile_mode="default", prewarm=2,
                       full=False, inductor=options, top_kernels=50, attention="eager", log=lambda line: None)
    assert all(s["top_kernels"] == 50 for s in seen if not s.get("untimed"))
    assert len(seen) == 4 and sum(bool(s.get("untimed")) for s in seen) == 2  # floor and lora, warmed and timed
    assert all(s["inductor"] == options and s["attention"] == "eager" for s in seen)
    assert result["inductor"] == options and result["attention"] == "eager"
    assert "inductor combo_kernels=True; inductor triton.cudagraph_trees=False; attention eager" in format_table(result)
    assert bench.parse_options(["a=True", "b=FALSE", "c=8", "d=text"]) == {"a": True, "b": False, "c": 8, "d": "text"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        bench.parse_options(["combo_kernels"])


def test_a_case_runs_the_attention_implementation_it_is_given(monkeypatch) -> None:
    """--attention IMPL: the case's model runs that implementation (routed through unipelt's wrapper
    when a prefix is attached), and the case's result says which."""
    from unipelt import attention as routing

    shape = case.SHAPES["bert-tiny"]
    assert case.build_base(shape, "eager").config._attn_implementation == "eager"
    assert case.build_base(shape).config._attn_implementation == "sdpa"
    calls = []
    original = routing._original_function
    monkeypatch.setattr(routing, "_original_function",
                        lambda module, impl: calls.append(impl) or original(module, impl))
    result = case.measure({"peer": "unipelt", "method": "prefix", "shape": "bert-tiny", "device": "cpu",
                           "steps": 1, "warmup": 0, "attention": "eager"})
    assert result["attention"] == "eager" and set(calls) == {"eager"}


def test_a_case_sets_inductor_options_by_dotted_name() -> None:
    import torch._inductor.config as inductor_config

    # the config's own patch restores the options; pytest's monkeypatch undo deletes them from torch's config
    # module instead (it hides them), and every later Inductor compile in the session then failed
    before = (inductor_config.combo_kernels, inductor_config.triton.cudagraph_trees)
    with inductor_config.patch({"combo_kernels": False, "triton.cudagraph_trees": True}):
        case.set_inductor_options({"combo_kernels": True, "triton.cudagraph_trees": False})
        assert inductor_config.combo_kernels is True and inductor_config.triton.cudagraph_trees is False
    assert (inductor_config.combo_kernels, inductor_config.triton.cudagraph_trees) == before
    for wrong in ("combo_kernelz", "tritonz.cudagraph_trees"):
        with pytest.raises(KeyError, match=wrong):
            case.set_inductor_options({wrong: True})


def test_a_failed_case_reports_the_line_that_names_its_exception() -> None:
    from unipelt.bench import error_line

    dynamo_tail = ("Traceback (most recent call last):\n  File \"case.py\", line 3, in <module>\n"
                   "torch._dynamo.exc.Unsupported: Attempted to call function marked as skipped\n"
                   "  Explanation: ...\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace.\n")
    assert error_line(dynamo_tail).startswith("torch._dynamo.exc.Unsupported: Attempted to call")
    assert error_line("Traceback ...\nKeyError: 'nope'\n") == "KeyError: 'nope'"
    assert error_line("killed\n") == "killed" and error_line("") == "no output"


def test_peak_trace_finds_the_blocks_alive_at_the_peak() -> None:
    trace = benchmark_script("peak_trace")
    events = [{"action": "alloc", "addr": 1, "size": 100}, {"action": "alloc", "addr": 2, "size": 50},
              {"action": "free_requested", "addr": 1, "size": 100},  # still allocated until completed
              {"action": "alloc", "addr": 3, "size": 20},
              {"action": "free_completed", "addr": 1, "size": 100}, {"action": "alloc", "addr": 4, "size": 60}]
    peak, alive = trace.live_at_peak(events)
    assert peak == 170 and sorted(e["addr"] for e in alive) == [1, 2, 3]
    frames = [{"filename": "/x/torch/nn/functional.py", "line": 5, "name": "linear"},
              {"filename": "/w/src/unipelt/methods/adapter.py", "line": 9, "name": "forward"}]
    assert trace.frames({"frames": frames}) == ["adapter.py:9:forward"]
