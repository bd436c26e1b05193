"""Prefix-style attention (key/value cache, padding, eager vs SDPA, causality) and prompt tuning.

Every check compares two computations that must agree exactly when the code is right (cached vs
uncached generation, generation vs one teacher-forced forward pass, a padded row vs that row alone,
eager vs SDPA), after the delta weights are perturbed so that the prefix or prompt really changes
the output (checked against the base model too: agreeing because nothing happens proves nothing).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import unipelt
from conftest import _BERT, BATCH, FAMILIES, HIDDEN, SEQ, VOCAB, _text, build, inputs, logits, perturb_
from unipelt.core import deltas

N_PROMPT = 4

LM_BUILDERS = {
    "gpt2": _text("GPT2LMHeadModel", "GPT2Config", n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB,
                  n_positions=64),
    "llama": _text("LlamaForCausalLM", "LlamaConfig", hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64),
    "t5": FAMILIES["t5"].build,  # T5ForConditionalGeneration
}

PREFIX_CONFIGS = {
    "prefix": {"method": "prefix", "length": 3},
    "gated_prefix": {"method": "prefix", "length": 3, "gate": True},
    "unipelt": {"method": "unipelt", "adapter": {"bottleneck": 8}, "prefix": {"length": 3}, "lora": {"r": 4}},
}

PREFIX_FAMILIES = ["bert", "roberta", "distilbert", "electra", "gpt2", "llama", "t5", "bart", "vit"]


def lm(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LM_BUILDERS[name]().to(dtype)


def perturb(model: torch.nn.Module, seed: int = 5, scale: float = 0.5) -> None:
    """Random delta weights (LoRA's B and the adapters start at zero, gates at 0.5 everywhere)."""
    perturb_(deltas(model).parameters(), seed, scale)


def attached(name: str, config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = unipelt.attach(lm(name, dtype), config)
    perturb(model)
    return model


def gen_dtype(name: str) -> torch.dtype:
    # T5 does not scale its attention scores: with random weights and random deltas its float32 logits
    # differ between two correct computation orders by up to ~1e-5. float64 keeps the comparison exact.
    return torch.float64 if name == "t5" else torch.float32


def token_ids(rows: int, length: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=g)


def generate(model, ids, mask, use_cache, steps=5):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, use_cache=use_cache, output_scores=True, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def teacher_forced(model, name, ids, mask, out) -> torch.Tensor:
    """The logits of every generated step from one forward pass over the generated sequence."""
    with torch.no_grad():
        if name == "t5":
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
        seq = out.sequences[:, :-1]
        full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        return model(input_ids=seq, attention_mask=full_mask).logits[:, ids.shape[1] - 1:]


def assert_steps_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = x.double(), y.double()  # generate() returns float32 scores
        assert torch.allclose(x, y, atol=atol, rtol=0), f"step {step}: max diff {(x - y).abs().max():.3g}"


# --------------------------------------------------------------------------------------------------
# prefix in generation with the key/value cache


@pytest.mark.parametrize("config", sorted(PREFIX_CONFIGS))
@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_prefix_cached_generation_equals_uncached(name, config):
    model = attached(name, PREFIX_CONFIGS[config], gen_dtype(name))
    ids = token_ids(2, 5)
    mask = torch.ones_like(ids)
    cached, uncached = generate(model, ids, mask, True), generate(model, ids, mask, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_steps_close(cached.logits, uncached.logits)
    assert_steps_close(cached.scores, uncached.scores)
    # ... and both are what one forward pass over the result gives (not just the same mistake twice)
    forward = teacher_forced(model, name, ids, mask, cached)
    assert_steps_close(cached.logits, list(forward.unbind(1)))
    # the prefix matters
    base = generate(lm(name, gen_dtype(name)), ids, mask, True)
    assert (base.logits[0] - cached.logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("config", sorted(PREFIX_CONFIGS))
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prefix_left_padded_row_generates_as_alone(name, config, use_cache):
    model = attached(name, PREFIX_CONFIGS[config])
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    batch = generate(model, ids, mask, use_cache)
    alone = generate(model, ids[1:, 2:], mask[1:, 2:], use_cache)
    assert torch.equal(batch.sequences[1, 6:], alone.sequences[0, 4:])
    assert_steps_close([x[1:] for x in batch.logits], alone.logits)
    # the unpadded row is unaffected by its neighbour's padding too
    first = generate(model, ids[:1], mask[:1], use_cache)
    assert_steps_close([x[:1] for x in batch.logits], first.logits)


def test_t5_gated_prefix_generation_uses_its_own_padding_mask():
    """generate() runs T5's encoder on its own: its pooled gates must see this batch's mask, not the last call's."""
    model = attached("t5", PREFIX_CONFIGS["unipelt"], torch.float64)
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = 0, 0
    with torch.no_grad():  # an earlier call of another shape, as in training
        model(input_ids=token_ids(4, 9, seed=8), decoder_input_ids=torch.zeros(4, 2, dtype=torch.long))
    out = generate(model, ids, mask, True)
    assert_steps_close(out.logits, list(teacher_forced(model, "t5", ids, mask, out).unbind(1)))


# --------------------------------------------------------------------------------------------------
# eager vs SDPA


def test_prefix_families():
    supported = [n for n in FAMILIES if unipelt.families.family_of(build(n)).supports_prefix]
    assert sorted(supported) == sorted(PREFIX_FAMILIES)
    with pytest.raises(unipelt.ConfigError, match="deberta-v2"):
        unipelt.attach(build("deberta-v2"), "prefix")


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_a_direct_prefix_trains_one_table_and_saves_one_prefix_per_attention(name, tmp_path):
    """Without the MLP, every attention's prefix is a view of one trainable table (one gradient accumulation
    and one optimizer state per step, not one per attention); ``save`` still writes (2, l, d_kv) per attention,
    and loading puts each back where it came from. A prefix of another shape is refused by name."""
    from safetensors.torch import load_file

    model = unipelt.attach(build(name), {"method": "prefix", "length": 3, "reparam": False})
    method = deltas(model)["prefix"]
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable == ["table"]
    assert method.table.shape == (3, sum(2 * dkv for dkv in method.kv_dims.values()))
    perturb_(method.parameters(), seed=3, scale=0.5)
    batch = inputs(name)
    model(**batch).logits.square().mean().backward()
    pieces = method.table.grad.split([2 * dkv for dkv in method.kv_dims.values()], dim=1)
    assert all(piece.abs().sum() > 0 for piece in pieces)  # every attention's prefix is trained
    out = logits(model, batch)
    unipelt.save(model, tmp_path)
    saved = load_file(str(tmp_path / "delta.safetensors"))
    keys = sorted(k for k in saved if k.startswith("prefix."))
    assert keys == sorted(f"prefix.prefixes.{k}" for k in method.kv_dims)
    first = next(iter(method.kv_dims))
    torch.testing.assert_close(saved[f"prefix.prefixes.{first}"], method._all_prefixes()[first].detach())
    fresh = unipelt.load(build(name), tmp_path)
    torch.testing.assert_close(logits(fresh, batch), out, rtol=0, atol=1e-6)
    # a prefix of the wrong length is named, not reshaped into the table; a missing one too
    own = {k.removeprefix("prefix."): v for k, v in saved.items() if k.startswith("prefix.")}
    with pytest.raises(unipelt.ConfigError, match=f"saved prefix for {first} has shape"):
        deltas(fresh)["prefix"].load_delta_state({**own, f"prefixes.{first}": own[f"prefixes.{first}"][:, :2]})
    with pytest.raises(unipelt.ConfigError, match="its prefixes are for"):
        deltas(fresh)["prefix"].load_delta_state({k: v for k, v in own.items() if k != f"prefixes.{first}"})


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("config", ["prefix", "unipelt"])
@pytest.mark.parametrize("name", PREFIX_FAMILIES)
def test_prefix_eager_equals_sdpa(name, config, padded):
    batch = inputs(name, padded=padded)
    outs = {}
    for impl in ("eager", "sdpa"):
        # float64: T5's unscaled attention makes float32 eager and SDPA differ by ~1e-4 with random deltas
        model = build(name).double()
        model.set_attn_implementation(impl)
        unipelt.attach(model, PREFIX_CONFIGS[config])
        perturb(model)
        assert {c._attn_implementation for c in unipelt.attention._configs(model)} == {f"unipelt_{impl}"}
        outs[impl] = logits(model, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
    # 1e-6, not float64's 1e-12: LLaMA's and ViT's eager attention take the softmax in float32
    assert torch.allclose(outs["eager"], outs["sdpa"], atol=1e-6, rtol=0), (outs["eager"] - outs["sdpa"]).abs().max()
    base = build(name).double()
    base_out = logits(base, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
    assert (base_out - outs["sdpa"]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------
# FlexAttention (its block mask widened by the prefix columns) and implementations that cannot take a prefix


def flex_or_sdpa(impl: str, config, seed: int = 5, dtype: torch.dtype = torch.float32):
    model = lm("llama", dtype).eval()
    model.set_attn_implementation(impl)
    unipelt.attach(model, config)
    perturb(model, seed=seed)
    return model


@pytest.mark.parametrize("padding", ["right", "left", "none"])  # left: the first key hidden from a row
@pytest.mark.parametrize("config", ["prefix", "gated_prefix", "unipelt"])
def test_prefix_flex_attention_equals_sdpa(config, padding):
    """Forward only: FlexAttention has no backward on the CPU. In float64: outside torch.compile the prefix
    goes through FlexAttention's unfused form (the CPU's only one with a log-sum-exp), which takes it."""
    batch = inputs("llama", padded=padding == "right")
    if padding == "left":
        batch["attention_mask"][-1, :2] = 0
    outs = {impl: logits(flex_or_sdpa(impl, PREFIX_CONFIGS[config], dtype=torch.float64), batch)
            for impl in ("sdpa", "flex_attention")}
    assert torch.allclose(outs["flex_attention"], outs["sdpa"], atol=1e-10, rtol=0)
    assert (logits(lm("llama", torch.float64).eval(), batch) - outs["sdpa"]).abs().max() > 1e-4


def test_gated_prefix_under_compiled_flex_attention_on_the_cpu():
    """Compiled on the CPU, FlexAttention returns no log-sum-exp (Inductor's CPU form is inference-only), so
    the gated share falls back to the second call: the same function as eager SDPA."""
    batch = inputs("llama")
    sdpa = logits(flex_or_sdpa("sdpa", PREFIX_CONFIGS["unipelt"]), batch)
    compiled = torch.compile(flex_or_sdpa("flex_attention", PREFIX_CONFIGS["unipelt"]))
    assert torch.allclose(logits(compiled, batch), sdpa, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["bert", "bart", "vit"])
def test_unipelt_under_flex_attention_equals_sdpa_in_encoders(name):
    """Bidirectional attention (encoder-decoder cross attention too, in BART): the model's own mask function,
    a padding mask (none for ViT), asked at the shifted key index. Forward only (see above)."""
    batch = inputs(name)
    outs = {}
    for impl in ("sdpa", "flex_attention"):
        model = build(name).eval()
        model.set_attn_implementation(impl)
        unipelt.attach(model, PREFIX_CONFIGS["unipelt"])
        perturb(model)
        outs[impl] = logits(model, batch)
    assert torch.allclose(outs["flex_attention"], outs["sdpa"], atol=1e-5, rtol=0)
    assert (logits(build(name).eval(), batch) - outs["sdpa"]).abs().max() > 1e-4


@pytest.mark.parametrize("gate", [False, True])
def test_flex_attention_serves_prefix_tasks_row_by_row(tmp_path, gate):
    """Each task's prefix is hidden from the other tasks' rows inside the widened block mask; a gated one's
    share (from the log-sum-exp) is zero on the other tasks' rows too."""
    folders = {}
    for i, length in enumerate((3, 2)):
        config = {"method": "prefix", "length": length, "gate": gate}
        folders[f"t{i}"] = unipelt.save(flex_or_sdpa("sdpa", config, seed=i), tmp_path / f"t{i}")
    batch = inputs("llama")
    served = lm("llama").eval()
    served.set_attn_implementation("flex_attention")
    unipelt.load_tasks(served, folders)
    task_ids = torch.tensor([1, 0, 1])
    out = logits(served, {**batch, "task_ids": task_ids})
    for row, task in enumerate(task_ids.tolist()):
        alone = logits(unipelt.load(lm("llama").eval(), folders[f"t{task}"]), batch)
        torch.testing.assert_close(out[row], alone[row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", ["shifted", "table"])
def test_widened_block_mask_without_a_mask_of_the_models(form):
    """No model mask: causal prefill (prefix columns, then the causal triangle), a decoding step (every
    key), and served tasks in bidirectional attention (a task's prefix hidden from other tasks' rows). Both
    forms of the mask function: shifted (eager, and compiled on a GPU) and the table (compiled on the CPU)."""
    from torch.nn.attention.flex_attention import create_mask

    from unipelt.attention import _prefix_mask_from_table, _prefix_mask_shifted, _widen_block_mask

    make = {"shifted": _prefix_mask_shifted, "table": _prefix_mask_from_table}[form]

    def table(mask, query, key, n, spans=(), causal=True):
        return create_mask(make(mask, n, list(spans), query, key, causal), 2, 1, query.shape[2], key.shape[2] + n,
                           device="cpu")[:, 0]

    query, key = torch.zeros(2, 4, 5, 8), torch.zeros(2, 2, 5, 8)
    prefill = table(None, query, key, 3)
    expected = torch.cat([torch.ones(5, 3, dtype=torch.bool), torch.ones(5, 5, dtype=torch.bool).tril()], 1)
    assert torch.equal(prefill, expected.expand(2, 5, 8))
    assert table(None, torch.zeros(2, 4, 1, 8), torch.zeros(2, 2, 6, 8), 3).all()  # a decoding step
    served = table(None, query, key, 3, [(0, 3, torch.tensor([True, False]))], causal=False)
    assert served[0].all() and not served[1, :, :3].any() and served[1, :, 3:].all()
    assert _widen_block_mask(None, 3, [], query, key, causal=False) is None


def test_flex_attention_with_a_dense_mask_is_refused_by_name():
    """A dense mask under FlexAttention: the merge steps aside and the widened path says what it needs."""
    from unipelt.attention import _flex_with_prefix_apart, _widen_block_mask

    query, key = torch.zeros(2, 4, 5, 8), torch.zeros(2, 2, 5, 8)
    dense = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    prefix = [torch.zeros(2, 2, 3, 8)]
    assert _flex_with_prefix_apart(None, query, key, key, dense, prefix, prefix, [None], [None], True, {}) is None
    with pytest.raises(TypeError, match="needs a BlockMask or no mask, got Tensor"):
        _widen_block_mask(dense, 3, [], query, key, causal=True)


def test_both_forms_of_the_widened_mask_agree_on_a_models_padded_causal_mask():
    """The model's own block mask (LLaMA, left padding in one row) widened by 3 prefix columns, one of them
    a served task's span: the shifted form and the table give the same visibility."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    from unipelt.attention import _prefix_mask_from_table, _prefix_mask_shifted

    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)

    def models(batch, head, q, kv):
        return (kv <= q) & padding[batch, kv]

    mask = create_block_mask(models, 2, None, 6, 6, device="cpu")
    query, key = torch.zeros(2, 4, 6, 8), torch.zeros(2, 2, 6, 8)
    spans = [(1, 2, torch.tensor([False, True]))]
    tables = [create_mask(make(mask, 3, spans, query, key, True), 2, 1, 6, 9, device="cpu")
              for make in (_prefix_mask_shifted, _prefix_mask_from_table)]
    assert torch.equal(tables[0], tables[1])
    expected = torch.cat([torch.ones(2, 1, 6, 3, dtype=torch.bool), create_mask(models, 2, 1, 6, 6, device="cpu")], -1)
    expected[0, :, :, 1:3] = False
    assert torch.equal(tables[0], expected)


def test_prefix_merged_by_the_log_sum_exp_equals_one_call_over_the_concatenated_keys():
    """FlexAttention runs the model's keys under the model's own mask and merges the prefixes in by its
    log-sum-exp (``_merge_prefix``). Against SDPA over the concatenated keys (and its second call for a
    per-query gate), values and gradients in float64, the gradient through the log-sum-exp included (here a
    differentiable math one): GQA (4 query heads on 2 kv heads), a causal mask, two providers (one with a
    per-query gate, one a served task's prefix hidden from the second row), and a query that sees none of
    the model's keys (left padding: its log-sum-exp is -inf, as FlexAttention returns it)."""
    from unipelt.attention import _merge_prefix

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, q_len, hd, lengths = 2, 4, 2, 5, 8, (3, 2)
    n = sum(lengths)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    query, key, value = leaf(b, heads, q_len, hd), leaf(b, kv_heads, q_len, hd), leaf(b, kv_heads, q_len, hd)
    keys, values = [leaf(b, kv_heads, l, hd) for l in lengths], [leaf(b, kv_heads, l, hd) for l in lengths]
    gate = torch.sigmoid(leaf(b, q_len, 1))
    rows = torch.tensor([True, False])
    tokens = torch.ones(q_len, q_len, dtype=torch.bool).tril().expand(b, 1, q_len, q_len).clone()
    tokens[1, :, :, :2] = False  # the second row's first two keys are padding: its first query sees none
    scale = 0.3

    def wide(t):
        return t.repeat_interleave(heads // kv_heads, 1)

    scores = (query @ wide(key).transpose(-1, -2) * scale).masked_fill(~tokens, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(tokens, torch.softmax(scores, -1).nan_to_num(), 0.0)
    out = (probs @ wide(value)).transpose(1, 2)
    ours, total = _merge_prefix(query, out, lse, keys, values, [gate, None], [None, rows], scale)

    visible = torch.cat([torch.ones(b, 1, q_len, lengths[0], dtype=torch.bool),
                         rows.view(b, 1, 1, 1).expand(b, 1, q_len, lengths[1]), tokens], -1)
    all_keys = wide(torch.cat([*keys, key], 2))
    all_values = wide(torch.cat([*values, value], 2))
    one = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=visible, scale=scale)
    first = F.scaled_dot_product_attention(query, all_keys, torch.cat(
        [wide(values[0]), torch.zeros_like(all_values[:, :, lengths[0]:])], 2), attn_mask=visible, scale=scale)
    expected = (one + (gate.unsqueeze(1) - 1) * first).transpose(1, 2)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    all_scores = (query @ all_keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(total, torch.logsumexp(all_scores, -1), atol=1e-12, rtol=0)
    assert (lse[1, :, 0] == float("-inf")).all() and n == 5
    weight = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    leaves = (query, key, value, *keys, *values)
    grads = torch.autograd.grad((ours * weight).sum(), leaves, retain_graph=True)
    for got, want in zip(grads, torch.autograd.grad((expected * weight).sum(), leaves), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_an_attention_that_reads_only_padding_masks_refuses_a_prefix():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("padding_only_test", sdpa_attention_forward)
    model = lm("llama")
    model.set_attn_implementation("padding_only_test")
    unipelt.attach(model, "prefix")
    with pytest.raises(unipelt.ConfigError, match=r"'padding_only_test' cannot take a prefix.*set_attn_implementation"):
        model(input_ids=token_ids(2, 8))


# --------------------------------------------------------------------------------------------------
# a gated prefix in a causal decoder does not read future tokens


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("config", ["gated_prefix", "unipelt"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gated_prefix_is_causal(name, config, impl):
    model = lm(name)
    model.set_attn_implementation(impl)
    unipelt.attach(model, PREFIX_CONFIGS[config])
    perturb(model, scale=1.0)  # gate weights far from 0: a pooled gate would move with the future tokens
    assert any("gates" in n for n, _ in deltas(model).named_parameters())
    ids = token_ids(2, 8)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for i in (0, 3, 6):
            changed = ids.clone()
            changed[:, i + 1:] = token_ids(2, 8, seed=10 + i)[:, i + 1:]
            out = model(input_ids=changed).logits
            assert torch.allclose(out[:, :i + 1], ref[:, :i + 1], atol=1e-6, rtol=0), f"position <= {i} leaked"
            assert (out[:, i + 1:] - ref[:, i + 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_per_query_prefix_gate_scales_what_the_prefix_values_add(name, impl):
    """In a decoder the gate g scales what the prefix's values add to each query's attention output, while
    the prefix keys keep their share of the softmax: g = 1 is the ungated prefix, g = 0 the prefix with
    zero values, and the attention output moves linearly in between."""
    from unipelt import attention

    model = lm(name)
    model.set_attn_implementation(impl)
    unipelt.attach(model, PREFIX_CONFIGS["gated_prefix"])
    perturb(model, scale=1.0)
    (method,) = deltas(model).values()
    first = model.transformer.h[0].attn if name == "gpt2" else model.model.layers[0].self_attn
    seen = []
    first.register_forward_hook(lambda module, args, out: seen.append(out[0].detach()))
    ids = token_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0

    def run(gate_bias: float | None = None, value_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the first attention's output, with every gate at ``sigmoid(gate_bias)``, or
        ungated with the prefix values scaled by ``value_scale``."""
        saved = dict(attention._PROVIDERS)
        with torch.no_grad():
            for gate in method.gates.values():
                gate.proj.weight.zero_()
                gate.proj.bias.fill_(gate_bias or 0.0)
            if value_scale is not None:
                for module, providers in saved.items():
                    attention._PROVIDERS[module] = [
                        lambda *a, provide=provide: (lambda k, v, g, *rest: (k, v * value_scale, None, *rest))(
                            *provide(*a)) for provide in providers]
            try:
                logits = model(input_ids=ids, attention_mask=mask).logits
            finally:
                attention._PROVIDERS.update(saved)
        return logits, seen.pop()

    open_logits, open_attention = run(gate_bias=40.0)  # sigmoid(40) is 1 in float32
    closed_logits, closed_attention = run(gate_bias=-40.0)
    ungated_logits, ungated_attention = run(value_scale=1.0)
    zero_logits, zero_attention = run(value_scale=0.0)
    half_logits, half_attention = run(gate_bias=0.0)
    assert torch.allclose(open_logits, ungated_logits, atol=1e-5)
    assert torch.allclose(closed_logits, zero_logits, atol=1e-5)
    assert (ungated_logits - zero_logits).abs().max() > 1e-3  # the prefix values matter
    assert torch.allclose(half_attention, (ungated_attention + zero_attention) / 2, atol=1e-5)
    assert not torch.allclose(half_logits, ungated_logits, atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # llama: grouped keys/values (4 query heads on 2)
def test_eager_per_query_gates_take_the_share_from_the_weights(name, monkeypatch):
    """Eager attention returns its weights: each gated provider's share is those weights on its keys
    times its values, with no second attention call. It equals the second call's result (the definition),
    in values and gradients, with two gated prefixes, a padding mask and training-mode dropout off."""
    from unipelt import attention

    def run(from_weights: bool):
        if not from_weights:
            monkeypatch.setattr(attention, "_share_from_weights", lambda *args: None)
        model = lm(name)
        model.set_attn_implementation("eager")
        unipelt.attach(model, PREFIX_CONFIGS["gated_prefix"])
        unipelt.attach(model, {"method": "prefix", "length": 2, "gate": True})
        perturb(model, scale=1.0)
        calls = []
        inner = attention._original_function
        monkeypatch.setattr(attention, "_original_function",
                            lambda module, kind: (lambda *a, **k: calls.append(1) or inner(module, kind)(*a, **k)))
        ids = token_ids(2, 8)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        grads = {n: p.grad.clone() for n, p in deltas(model).named_parameters() if p.grad is not None}
        monkeypatch.undo()
        return logits.detach(), grads, len(calls)

    reference, reference_grads, reference_calls = run(from_weights=False)
    shared, shared_grads, shared_calls = run(from_weights=True)
    layers = 2
    assert reference_calls == 3 * layers and shared_calls == layers
    assert torch.allclose(shared, reference, atol=1e-5, rtol=1e-5)
    assert reference_grads.keys() == shared_grads.keys()
    assert sum("gates" in n for n in shared_grads) == 2 * 2 * layers  # W and b of two prefixes' gates
    for n, g in reference_grads.items():
        assert torch.allclose(shared_grads[n], g, atol=1e-5, rtol=1e-4), n


# --------------------------------------------------------------------------------------------------
# prompt tuning


def bert(cls_name: str, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(**_BERT)
    config.num_labels = num_labels
    return getattr(transformers, cls_name)(config).eval()


def prompt_of(model) -> torch.Tensor:
    return deltas(model)["prompt"].embedding


def capture(module: torch.nn.Module, store: list):
    return module.register_forward_hook(lambda m, i, o: store.append(o.detach().clone()))


def text_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs("bert", seed=seed).items()}


def test_prompt_token_classification_length_and_loss():
    model = unipelt.attach(bert("BertForTokenClassification", 3), {"method": "prompt", "length": N_PROMPT})
    batch = text_batch()
    labels = torch.randint(0, 3, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    labels[batch["attention_mask"] == 0] = -100
    inner: list = []
    handle = capture(model.classifier, inner)
    out = model(**batch, labels=labels)
    handle.remove()
    assert out.logits.shape == (BATCH, SEQ, 3)
    assert inner[0].shape == (BATCH, SEQ + N_PROMPT, 3)
    # the returned logits are the model's without the prompt positions 1..n (after [CLS])
    assert torch.equal(out.logits, torch.cat([inner[0][:, :1], inner[0][:, 1 + N_PROMPT:]], 1))
    manual = F.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6)
    out.loss.backward()
    assert prompt_of(model).grad is not None and prompt_of(model).grad.abs().sum() > 0


def test_prompt_question_answering_length_and_loss():
    model = unipelt.attach(bert("BertForQuestionAnswering", 2), {"method": "prompt", "length": N_PROMPT})
    batch = text_batch()
    start = torch.tensor([0, 3, SEQ])  # the last row's answer is out of range: ignored, as without a prompt
    end = torch.tensor([2, SEQ - 1, SEQ])
    out = model(**batch, start_positions=start, end_positions=end)
    assert out.start_logits.shape == (BATCH, SEQ) and out.end_logits.shape == (BATCH, SEQ)
    assert torch.isfinite(out.start_logits).all() and torch.isfinite(out.end_logits).all()

    def ce(scores, positions):
        return F.cross_entropy(scores, positions.clamp(0, SEQ), ignore_index=SEQ)

    manual = (ce(out.start_logits, start) + ce(out.end_logits, end)) / 2
    assert torch.allclose(out.loss, manual, atol=1e-6), (out.loss, manual)
    out.loss.backward()
    assert prompt_of(model).grad is not None and prompt_of(model).grad.abs().sum() > 0


def test_prompt_goes_after_cls_in_bert():
    model = unipelt.attach(bert("BertForTokenClassification", 3), {"method": "prompt", "length": N_PROMPT})
    word_embeddings = model.bert.embeddings.word_embeddings
    batch = text_batch()
    seen: list = []
    handle = capture(word_embeddings, seen)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    emb, ids = seen[0], batch["input_ids"]
    assert emb.shape == (BATCH, SEQ + N_PROMPT, HIDDEN)
    table = word_embeddings.weight.detach()
    assert torch.equal(emb[:, 0], table[ids[:, 0]])  # position 0 is still the real [CLS]
    assert torch.equal(emb[:, 1:1 + N_PROMPT], prompt_of(model).detach().expand(BATCH, -1, -1))
    assert torch.equal(emb[:, 1 + N_PROMPT:], table[ids[:, 1:]])


def test_prompt_goes_first_in_gpt2():
    model = unipelt.attach(lm("gpt2"), {"method": "prompt", "length": N_PROMPT})
    ids = token_ids(2, 5)
    seen: list = []
    handle = capture(model.transformer.wte, seen)
    with torch.no_grad():
        out = model(input_ids=ids)
    handle.remove()
    table = model.transformer.wte.weight.detach()
    assert torch.equal(seen[0][:, :N_PROMPT], prompt_of(model).detach().expand(2, -1, -1))
    assert torch.equal(seen[0][:, N_PROMPT:], table[ids])
    assert out.logits.shape == (2, 5, VOCAB)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prompt_reaches_the_output_and_only_it_trains(name):
    model = unipelt.attach(build(name), {"method": "prompt", "length": N_PROMPT})
    heads = tuple(unipelt.core.attachment(model).model_map.head_modules)
    assert unipelt.trainable_parameters(model)["prompt"] == N_PROMPT * HIDDEN
    batch = inputs(name)
    out = model(**batch).logits
    assert out.shape == logits(build(name), batch).shape
    out.pow(2).sum().backward()
    grad = prompt_of(model).grad
    assert grad is not None and grad.abs().sum() > 0, "the prompt does not reach the output"
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n == "unipelt_deltas.prompt.embedding" or n.startswith(heads) for n in with_grad)


def test_prompt_t5_encoder_model():
    """T5EncoderModel: the prompt goes through the encoder's own embedding layer and is stripped again."""
    build_encoder = _text("T5EncoderModel", "T5Config", d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          vocab_size=VOCAB)
    torch.manual_seed(0)
    model = unipelt.attach(build_encoder(), {"method": "prompt", "length": N_PROMPT})
    ids = token_ids(2, 5)
    out = model(input_ids=ids).last_hidden_state
    assert out.shape == (2, 5, HIDDEN)
    # a random direction: the squares of an RMSNorm's output (gain 1) sum to a constant, nearly
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert prompt_of(model).grad is not None and prompt_of(model).grad.abs().sum() > 0


@pytest.mark.parametrize("config", [
    {"method": "prompt", "length": N_PROMPT},
    {"method": "unipelt", "adapter": {"bottleneck": 8}, "prefix": {"length": 3}, "lora": {"r": 4},
     "prompt": {"length": N_PROMPT}},
], ids=["prompt", "unipelt_prompt"])
def test_prompt_t5_generation_with_and_without_cache(config):
    model = unipelt.attach(lm("t5", torch.float64), config)
    perturb(model)
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = 0, 0
    with torch.no_grad():  # an earlier call of another shape: generate() must not reuse its context
        model(input_ids=token_ids(4, 9, seed=8), decoder_input_ids=torch.zeros(4, 2, dtype=torch.long))
    cached, uncached = generate(model, ids, mask, True), generate(model, ids, mask, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_steps_close(cached.logits, uncached.logits)
    assert_steps_close(cached.scores, uncached.scores)
    # generation sees the prompt exactly as a forward pass of the model does
    assert_steps_close(cached.logits, list(teacher_forced(model, "t5", ids, mask, cached).unbind(1)))
    base = generate(lm("t5", torch.float64), ids, mask, True)
    assert (base.logits[0] - cached.logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prompt_decoder_only_generation(name):
    model = unipelt.attach(lm(name), {"method": "prompt", "length": N_PROMPT})
    ids = token_ids(2, 5)
    mask = torch.ones_like(ids)
    with pytest.raises(NotImplementedError, match="prefix"):
        generate(model, ids, mask, True)
    out = generate(model, ids, mask, False)  # without a cache it works, and matches a forward pass
    assert out.sequences.shape == (2, 10)
    assert_steps_close(out.logits, list(teacher_forced(model, name, ids, mask, out).unbind(1)))
    base = generate(lm(name), ids, mask, False)
    assert (base.logits[0] - out.logits[0]).abs().max() > 1e-3
    # generate() passes position_ids: with left padding the padded row still generates as it does alone
    ids[1, :2], mask[1, :2] = 0, 0
    batch = generate(model, ids, mask, False)
    alone = generate(model, ids[1:, 2:], mask[1:, 2:], False)
    assert torch.equal(batch.sequences[1, 5:], alone.sequences[0, 3:])
    assert_steps_close([x[1:] for x in batch.logits], alone.logits)


def test_prompt_vit_inserts_after_cls():
    model = unipelt.attach(build("vit"), {"method": "prompt", "length": N_PROMPT})
    base = build("vit")
    batch = inputs("vit")
    seen: list = []
    handle = capture(model.base_model.embeddings, seen)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        base_out = base(**batch, output_hidden_states=True)
    handle.remove()
    base_len = base_out.hidden_states[0].shape[1]  # [CLS] + patches
    assert base_len == 1 + (16 // 8) ** 2
    assert all(h.shape[1] == base_len + N_PROMPT for h in out.hidden_states)
    assert out.logits.shape == base_out.logits.shape == (BATCH, 3)
    emb, base_emb = seen[0], base_out.hidden_states[0]
    assert torch.equal(emb[:, :1], base_emb[:, :1])
    assert torch.equal(emb[:, 1:1 + N_PROMPT], prompt_of(model).detach().expand(BATCH, -1, -1))
    assert torch.equal(emb[:, 1 + N_PROMPT:], base_emb[:, 1:])


# --------------------------------------------------------------------------------------------------
# a gated prefix in bidirectional attention: G_P = sigmoid(W_GP mean(x) + b), x averaged over real tokens


@pytest.mark.parametrize("pooling", ["mean", "logit_mean"])
def test_bidirectional_prefix_gate_is_the_mean_of_real_tokens_sigmoids(monkeypatch, pooling):
    """UniPELT's prefix gate: the mean over the real tokens of the per-token sigmoids, scaling P_k and P_v
    (``unipelt_legacy``'s ``logit_mean``: the sigmoid of the mean logit)."""
    from unipelt import attention

    model = build("bert")
    unipelt.attach(model, {**PREFIX_CONFIGS["gated_prefix"], "gate_pooling": pooling})
    perturb(model, scale=1.0)
    method = next(m for m in deltas(model).children() if hasattr(m, "gates") and len(m.gates))
    layer = model.bert.encoder.layer[0].attention.self
    seen = {}
    layer.query.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0].detach()))
    (provider,) = attention._PROVIDERS[layer]

    def recording(module, query, key, value):
        pk, pv, query_gate, *rest = provider(module, query, key, value)
        seen["pk"] = pk.detach()
        return (pk, pv, query_gate, *rest)

    monkeypatch.setitem(attention._PROVIDERS, layer, [recording])
    batch = inputs("bert")  # the last row ends in two padding tokens
    with torch.no_grad():
        model(**batch)
        prefix = method._all_prefixes()[next(iter(method.sites))][0]  # (l, d_kv) keys of layer 0
        mask = batch["attention_mask"].float().unsqueeze(-1)
        gate = method.gates[next(iter(method.sites))].proj
        logits = seen["x"] @ gate.weight.t() + gate.bias  # (b, T, 1)
        if pooling == "mean":  # (b, 1): the mean of the sigmoids over real tokens only
            expected = (torch.sigmoid(logits) * mask).sum(1) / mask.sum(1)
        else:
            expected = torch.sigmoid((logits * mask).sum(1) / mask.sum(1))
        got = seen["pk"].transpose(1, 2).reshape(BATCH, prefix.shape[0], -1) / prefix  # (b, l, d_kv): g everywhere
    assert torch.allclose(got, expected[:, :, None].expand_as(got), atol=1e-5)
    assert (expected.max() - expected.min()) > 1e-3  # rows differ: the gate depends on each row's tokens
