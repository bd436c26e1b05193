"""Quantized bases: bitsandbytes 4-bit (nf4, fp4) and 8-bit layers, on the CPU (bitsandbytes 0.50+ runs there).

A tiny LLaMA and a tiny BERT are saved and loaded back through ``from_pretrained(quantization_config=
BitsAndBytesConfig(...))``, as a user quantizes a model. For every method that leaves W to ``Projection`` (LoRA,
DoRA, IA3, adapters, prefix, prompt, LN tuning, UniPELT): attach with the full-precision model's trainable count,
forward and backward with gradients in the delta and head only, save and load into a freshly quantized base with
equal outputs. LoRA adds to the quantized layer's own output (``dequantized W x + s B A x``); merge dequantizes,
adds and quantizes again, within one quantization step of each weight; a method that does not declare support, or
a quantized head that should train, is a one-line error. The QLoRA benchmark's smoke run closes the file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import unipelt
from unipelt import core, quantized
from unipelt.families import UnsupportedModelError
from unipelt.methods.ia3 import IA3
from unipelt.sites import Projection, resolve

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[quantized]')")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend's note about an optional hub kernel


def _bnb_runs() -> str | None:
    """Why bitsandbytes' 4-bit and 8-bit layers do not run on this CPU (None: they do)."""
    try:
        x = torch.randn(2, 64)
        bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")(x)
        bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")(x)
    except Exception as e:  # noqa: BLE001 (any failure means: cannot run here)
        return f"{type(e).__name__}: {e}"
    return None


_WHY = _bnb_runs()
if _WHY is not None:
    pytest.skip(f"bitsandbytes {bnb.__version__} does not run on this CPU: {_WHY}", allow_module_level=True)

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# k and v are 32 wide (2 KV heads of 16): bitsandbytes' CPU layout for its bf16 kernel needs multiples of 32
LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=96, max_position_embeddings=64, pad_token_id=0)
BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=96,
            max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CLASSES = {"llama": ("LlamaForCausalLM", "LlamaConfig", LLAMA), "bert": ("BertForSequenceClassification", "BertConfig",
                                                                          BERT)}
# every method that does not need to write W at run time, as the issue names them
METHODS = {
    "lora": {"method": "lora", "targets": ["all-linear"]},
    "dora": {"method": "lora", "dora": True},
    "ia3": {"method": "ia3"},
    "adapter": {"method": "houlsby"},
    "prefix": {"method": "prefix", "length": 4, "reparam_hidden": 16},
    "prompt": {"method": "prompt", "length": 4},
    "ln": {"method": "ln"},
    "unipelt": {"method": "unipelt"},
}
STORE = "unipelt_deltas"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The tiny models, randomly initialised and saved, as checkpoints to quantize on loading."""
    folders = {}
    for family, (cls, config_cls, shape) in CLASSES.items():
        torch.manual_seed(0)
        model = getattr(transformers, cls)(getattr(transformers, config_cls)(**shape))
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
    return folders


def load(saved: dict[str, Path], family: str, quant: str | None, skip_head: bool = True) -> torch.nn.Module:
    """The saved model, quantized on loading (``quant`` one of QUANT; None: full precision), in eval mode.

    bitsandbytes' CPU backend repacks a 4-bit weight for a bf16 kernel at the first eval-mode call, which casts the
    inputs to bf16; the comparisons here take the float32 path (``test_dequantize_after_the_cpu_repack`` covers the
    repacked layout)."""
    cls = getattr(transformers, CLASSES[family][0])
    if quant is None:
        return cls.from_pretrained(saved[family]).eval()
    options = dict(QUANT[quant])
    if family == "bert" and skip_head:  # a new classifier trains: keep it in full precision
        options["llm_int8_skip_modules"] = ["classifier"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(saved[family], quantization_config=transformers.BitsAndBytesConfig(**options),
                                    device_map="cpu").eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def batch(family: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8-bit: bitsandbytes' note that it casts the inputs to float16
        return model(**batch(family)).logits


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every delta off its start (LoRA's B = 0, IA3's ones), so that each part shapes the output."""
    gen = torch.Generator().manual_seed(seed)
    for p in core.deltas(model).parameters():
        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


def test_sites_read_the_sizes_from_the_layer(saved) -> None:
    """A 4-bit weight is (out * in / 2, 1) packed bytes: the sites read in/out from the layer, and ``weight()`` is
    the dequantized W, within a quantization step of the full-precision one."""
    full_model = load(saved, "llama", None)
    full = resolve(full_model)
    for quant, kind in (("nf4", "4-bit"), ("int8", "8-bit")):
        model = load(saved, "llama", quant)
        assert core.base_parameter_count(model) == core.base_parameter_count(full_model)  # not the packed bytes
        model_map = resolve(model)
        assert model_map.quantized == kind and full.quantized is None
        for layer, full_layer in zip(model_map.layers, full.layers, strict=True):
            pairs = [(att.projection(t), full_att.projection(t)) for att, full_att in
                     zip(layer.attentions, full_layer.attentions, strict=True) for t in "qkvo"]
            pairs += [(layer.ffn_out, full_layer.ffn_out), *zip(layer.ffn_in, full_layer.ffn_in, strict=True)]
            for proj, ref in pairs:
                assert proj.quantized == kind and not proj.foldable
                assert (proj.in_features, proj.out_features) == (proj.module.in_features, proj.module.out_features)
                assert (proj.in_features, proj.out_features) == (ref.in_features, ref.out_features)
                w = proj.weight()
                assert w.shape == ref.weight().shape and w.dtype == torch.float32
                assert (w - ref.weight()).abs().max() <= 0.35 * ref.weight().abs().max()  # at most one 4-bit step


CASES = [(f, q, m) for f in ("llama", "bert") for q in ("nf4", "int8") for m in METHODS]
CASES += [("llama", "fp4", m) for m in ("lora", "dora", "ia3")]


@pytest.mark.parametrize(("family", "quant", "method"), CASES)
def test_method_trains_saves_and_loads_on_a_quantized_base(saved, tmp_path, family: str, quant: str,
                                                           method: str) -> None:
    model = unipelt.attach(load(saved, family, quant), METHODS[method])
    reference = unipelt.attach(load(saved, family, None), METHODS[method])
    assert core.trainable_parameters(model) == core.trainable_parameters(reference)
    perturb(model)
    model.train()  # transformers' train() must leave the methods' replaced forwards (LN tuning) in place
    loss = model(**batch(family)).logits.float().pow(2).mean()
    loss.backward()
    head = ("classifier",) if family == "bert" else ()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(n.startswith((STORE, *head)) for n in with_grad), with_grad
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters()
               if n.startswith(STORE) and p.grad is not None)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith((STORE, *head))]
    model.eval()
    out = logits(model, family)
    unipelt.save(model, tmp_path / "delta")
    fresh = unipelt.load(load(saved, family, quant), tmp_path / "delta")
    torch.testing.assert_close(logits(fresh, family), out, rtol=0, atol=1e-5)


# the rest of the catalogue, on a 4-bit base: the same checks, and merge where the method merges
REST = {
    "pissa": {"method": "lora", "init": "pissa"}, "olora": {"method": "lora", "init": "olora"},
    "bitfit": {"method": "bitfit"}, "krona": {"method": "krona", "a_out": 4, "a_in": 4},
    "krona_ffn": {"method": "krona_ffn", "a_out": 4, "a_in": 4}, "kadaptation": {"method": "kadaptation", "n": 4},
    "adapter_bias": {"method": "adapter_bias"}, "compacter": {"method": "compacter"},
    "sparse_adapter": {"method": "sparse_adapter"}, "poly": {"method": "poly"}, "rational": {"method": "rational"},
    "mam": {"method": "mam"}, "prefix_words": {"method": "prefix", "init": "words", "length": 4},
    "attempt": {"method": "attempt", "length": 3, "attention_hidden": 8},
}
REST_CASES = [(f, q, m) for f, q in (("llama", "nf4"), ("bert", "nf4"), ("bert", "int8")) for m in REST
              if not (f == "llama" and m == "bitfit")]


@pytest.mark.parametrize(("family", "quant", "method"), REST_CASES)
def test_the_rest_of_the_catalogue_runs_on_a_quantized_base(saved, tmp_path, family: str, quant: str,
                                                            method: str) -> None:
    config = dict(REST[method])
    if method == "attempt":  # its sources: prompt deltas saved from the same base
        config["sources"] = []
        for i in range(2):
            source = unipelt.attach(load(saved, family, quant), {"method": "prompt", "length": 3})
            perturb(source, seed=i)
            config["sources"].append(str(unipelt.save(source, tmp_path / f"source{i}")))
    model = unipelt.attach(load(saved, family, quant), config)
    assert core.trainable_parameters(model) == core.trainable_parameters(
        unipelt.attach(load(saved, family, None), config))
    perturb(model, scale=0.02)
    model.train()
    model(**batch(family)).logits.float().pow(2).mean().backward()
    head = ("classifier",) if family == "bert" else ()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any(n.startswith(STORE) for n in with_grad) and all(n.startswith((STORE, *head)) for n in with_grad)
    model.eval()
    unmerged = logits(model, family)
    assert torch.isfinite(unmerged).all()
    if all(m.mergeable() for m in core.deltas(model).values()):
        unipelt.save(model, tmp_path / "delta")
        full = logits(unipelt.load(load(saved, family, None), tmp_path / "delta"), family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unipelt.merge(model)
        assert core.attachment(model) is None
        merge_rms = float((logits(model, family) - unmerged).pow(2).mean().sqrt())
        assert merge_rms <= 2.5 * float((full - unmerged).pow(2).mean().sqrt())


def test_vpt_runs_on_a_4bit_vision_transformer(tmp_path) -> None:
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=16, patch_size=8, num_channels=3, num_labels=3)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    quant = transformers.BitsAndBytesConfig(**QUANT["nf4"], llm_int8_skip_modules=["classifier"])
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit", quantization_config=quant,
                                                                   device_map="cpu")
    unipelt.attach(model, {"method": "vpt_deep", "length": 2})
    assert resolve(model).quantized == "4-bit"
    perturb(model)
    model(pixel_values=torch.randn(2, 3, 16, 16)).logits.pow(2).mean().backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any(n.startswith(STORE) for n in with_grad) and all(n.startswith((STORE, "classifier")) for n in with_grad)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("fold", [False, True])
def test_lora_adds_to_the_quantized_layers_own_output(saved, quant: str, fold: bool) -> None:
    """``h = W x + s B A x`` with W the layer's own quantized product: for 4-bit that is ``dequantized W x`` (to
    float32 rounding); 8-bit's int8 product also rounds x, so there the check is the layer's own output. ``fold``
    cannot go into a quantized layer's GEMM: the same output hook serves."""
    model = unipelt.attach(load(saved, "llama", quant), {"method": "lora", "r": 4, "fold": fold})
    perturb(model, scale=0.1)
    lora = core.deltas(model)["lora"]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    for key, proj in lora.sites.items():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = proj.module(x)
            with unipelt.disabled(model):
                own = proj.module(x)
        pair = lora.pairs[key]
        delta = lora.scaling * F.linear(F.linear(x, pair.A.weight), pair.B.weight)
        assert float(delta.abs().max()) > 1e-2
        torch.testing.assert_close(h, own + delta, rtol=0, atol=1e-5)
        formula = F.linear(x, quantized.dequantize(proj.module)) + delta
        if quant == "int8":  # the int8 product of a float16-rounded, int8-rounded x: about 1% of the output
            assert float((h - formula).abs().max()) <= 0.02 * float(formula.abs().max())
        else:
            torch.testing.assert_close(h, formula, rtol=0, atol=1e-5)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dora_magnitude_starts_at_the_dequantized_norm(saved, quant: str) -> None:
    model = load(saved, "llama", quant)
    before = logits(model, "llama")
    unipelt.attach(model, {"method": "lora", "dora": True})
    dora = core.deltas(model)["lora"]
    for key, proj in dora.sites.items():
        torch.testing.assert_close(dora.pairs[key].m.detach(),
                                   torch.linalg.norm(quantized.dequantize(proj.module), dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model, "llama"), before, rtol=0, atol=1e-5)  # m / ||W||_c = 1 at init


def _half_step(module: torch.nn.Module) -> torch.Tensor:
    """Half a quantization step of each weight of ``module`` as stored now, ``(out, in)``: the most that rounding
    to the nearest code moves it. 4-bit: the block's absmax times half the largest gap between neighbouring codes;
    8-bit: the row's absmax / 127, halved."""
    weight = module.weight
    out_f, in_f = module.out_features, module.in_features
    if quantized.kind(module) == quantized.EIGHT_BIT:
        scb = weight.SCB if weight.SCB is not None else module.state.SCB
        return (scb.float() / 127 / 2)[:, None].expand(out_f, in_f)
    state = weight.quant_state
    absmax = state.absmax.float()
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    gap = float(state.code.sort().values.diff().max())
    return (absmax.repeat_interleave(state.blocksize)[:out_f * in_f] * gap / 2).view(out_f, in_f)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_requantizes_within_one_quantization_step(saved, tmp_path, quant: str, method: str) -> None:
    """Merge dequantizes, adds (or scales) and quantizes again: each merged weight lands within half a step of
    ``W + delta W``. On the outputs that is one more rounding of the merged weights: the merged model differs from
    the unmerged one by about what quantizing the base did (the same delta on the full-precision base against the
    quantized one), about sqrt(2) times it where every weight is merged (two roundings); the root mean square over
    the logits stays under 2.5 times it (measured here: LoRA on every projection 1.39x nf4, 1.83x fp4, 1.29x int8;
    DoRA on q, v under 1.1x; IA3 under 0.6x, a scaled row of a 4-bit block keeps its codes)."""
    config = {"lora": {"method": "lora", "targets": ["all-linear"]}, "dora": METHODS["dora"], "ia3": METHODS["ia3"]}
    model = unipelt.attach(load(saved, "llama", quant), config[method])
    perturb(model, scale=0.05)
    delta = core.deltas(model)[next(iter(core.deltas(model)))]
    expected = {}
    with torch.no_grad():
        if method == "ia3":
            for k, proj in delta.outputs.items():
                expected[proj.module] = quantized.dequantize(proj.module) * delta.scales[k][:, None]
            for k, proj in delta.inputs.items():
                expected[proj.module] = quantized.dequantize(proj.module) * delta.scales[k][None, :]
        else:
            for k, proj in delta.sites.items():
                expected[proj.module] = quantized.dequantize(proj.module) + delta.scaled_delta(k)
    unmerged = logits(model, "llama")
    unipelt.save(model, tmp_path / "delta")
    full = unipelt.load(load(saved, "llama", None), tmp_path / "delta")  # the same delta on the unquantized base
    quantization_error = logits(full, "llama") - unmerged
    with pytest.warns(UserWarning, match="quantized again"):
        unipelt.merge(model)
    assert not core.deltas(model) and core.attachment(model) is None
    worst = 0.0
    for module, want in expected.items():
        got = quantized.dequantize(module)
        # 8-bit rounds W to float16 before its int8 codes: a relative 2^-11 more
        bound = _half_step(module) * 1.0001 + want.abs() * 2 ** -11 + 1e-7
        assert bool(((got - want).abs() <= bound).all()), (quant, method)
        worst = max(worst, float(((got - want).abs() / _half_step(module)).max()))
    merge_error = logits(model, "llama") - unmerged
    rms = {"merge": float(merge_error.pow(2).mean().sqrt()), "quantization": float(quantization_error.pow(2).mean()
                                                                                     .sqrt())}
    print(f"\n{method} {quant}: logits' max |merged - unmerged| {float(merge_error.abs().max()):.2e} (rms "
          f"{rms['merge']:.2e}); max |quantized - full-precision base| {float(quantization_error.abs().max()):.2e} "
          f"(rms {rms['quantization']:.2e}); worst weight {worst:.3f} half-steps from W + delta W")
    assert 0 < rms["merge"] <= 2.5 * rms["quantization"]


def test_a_method_that_does_not_declare_support_is_a_one_line_error(saved, monkeypatch) -> None:
    monkeypatch.setattr(IA3, "quantized_base", False)
    with pytest.raises(UnsupportedModelError, match=r"method 'ia3' cannot run on this 4-bit \(bitsandbytes\) base: "
                                                    r"IA3 does not declare quantized_base = True"):
        unipelt.attach(load(saved, "llama", "nf4"), "ia3")
    monkeypatch.setattr(IA3, "quantized_base", "it writes W in place")
    with pytest.raises(UnsupportedModelError, match="method 'ia3' cannot run on this 8-bit .*: it writes W in place"):
        unipelt.attach(load(saved, "llama", "int8"), "ia3")
    model = load(saved, "llama", "nf4")
    with pytest.raises(UnsupportedModelError, match="'ia3'"):  # inside a composition too; nothing stays attached
        unipelt.attach(model, {"method": "composition", "methods": [{"method": "lora"}, {"method": "ia3"}]})
    assert core.attachment(model) is None and not core.deltas(model)
    unipelt.attach(load(saved, "llama", None), "ia3")  # a full-precision base: no declaration needed


def test_a_quantized_head_that_should_train_is_a_clear_error(saved) -> None:
    model = load(saved, "bert", "nf4", skip_head=False)
    with pytest.raises(UnsupportedModelError, match=r"task head \['classifier'\] .* llm_int8_skip_modules"):
        unipelt.attach(model, "lora")
    assert core.attachment(model) is None
    unipelt.attach(model, "lora", train_head=False)
    assert core.trainable_parameters(model)["head"] == 0


def test_a_delta_trained_on_a_4bit_base_loads_into_the_full_precision_one(saved, tmp_path) -> None:
    """QLoRA's use: train on the 4-bit base, serve on the full one (the quantization config is not part of the
    base's identity); the outputs then differ by what quantizing the base did."""
    model = unipelt.attach(load(saved, "llama", "nf4"), {"method": "lora", "targets": ["all-linear"]})
    perturb(model)
    unipelt.save(model, tmp_path / "delta")
    full = unipelt.load(load(saved, "llama", None), tmp_path / "delta")
    for name, tensor in core.deltas(model).state_dict().items():
        assert torch.equal(core.deltas(full).state_dict()[name], tensor)
    base_error = float((logits(load(saved, "llama", "nf4"), "llama") - logits(load(saved, "llama", None), "llama"))
                       .abs().max())
    assert float((logits(full, "llama") - logits(model, "llama")).abs().max()) <= 2 * base_error


def test_train_and_eval_keep_replaced_forwards_on_a_loaded_model(saved) -> None:
    """transformers 5 loads a model with hub kernels on and kernelizes it again at train() / eval(), which re-bound
    LLaMA's RMSNorm forward under LN tuning (and then detach failed): attach resets the kernels once."""
    model = load(saved, "llama", None)
    base = logits(model, "llama")
    unipelt.attach(model, "ln")
    model.train()
    model.eval()
    assert "forward" in model.model.norm.__dict__
    perturb(model)
    assert not torch.equal(logits(model, "llama"), base)
    unipelt.detach(model)
    torch.testing.assert_close(logits(model, "llama"), base, rtol=0, atol=0)


def test_dequantize_after_the_cpu_repack() -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 kernel at the first eval-mode call on such a CPU (its
    block scales rounded to bf16 on the way, bitsandbytes' own doing): the dequantized W is the same before and after
    to that rounding, and a merge into the repacked layer works."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu").eval()
    proj = Projection(layer, "layer")
    w = proj.weight()
    with torch.no_grad():
        layer(torch.randn(3, 64))
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the standard layout")
    assert layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(proj.weight(), w, rtol=2 ** -8, atol=1e-7)
    assert not layer.weight.quant_state.packing_format_for_cpu
    delta = torch.randn(64, 64) * 0.01
    proj.add_to_weight(delta)
    assert float((proj.weight() - (w + delta)).abs().max()) <= float(w.abs().max()) * 0.2
    with torch.no_grad():
        layer(torch.randn(3, 64))  # runs after the merge, repacked again or not


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "qlora.py"
    spec = importlib.util.spec_from_file_location("qlora_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qlora_benchmark_smoke(tmp_path, capsys) -> None:
    """benchmarks/qlora.py end to end on the CPU, tiny shape: both implementations' rows, the same trainable count
    and the same first loss (B = 0: both compute the base model's loss), the table and the JSON."""
    result = _benchmark_module().main(["--smoke", "--out", str(tmp_path / "qlora.json")])
    rows = {row["impl"]: row for row in result["rows"]}
    assert set(rows) == {"unipelt", "peft"}
    sizes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # q k v o gate up down
    assert rows["unipelt"]["trainable"] == rows["peft"]["trainable"] == 2 * 16 * sum(i + o for i, o in sizes)
    assert rows["unipelt"]["loss0"] == pytest.approx(rows["peft"]["loss0"], abs=2e-2)
    assert all(row["step_ms"] > 0 and len(row["step_ms_all"]) == result["steps"] for row in rows.values())
    assert json.loads((tmp_path / "qlora.json").read_text())["rows"] == result["rows"]
    assert "unipelt / peft: step time" in capsys.readouterr().out
