"""One benchmark case in its own process: a library's PEFT method on a random model, timed and measured.

Run as a script (``python case.py '{json spec}'``), never imported by the library: the ``adapters``
cases run it under another ``transformers`` version (``adapters`` pins its own), so it imports
nothing from unipelt unless the case is unipelt's. It prints one JSON line.

Every case trains the same function: the base model (no head), bf16 autocast on GPU, loss
``mean(last_hidden_state²)``, AdamW over the trainable parameters. The floor is the frozen base
with gradients through the activations only (the input embeddings' output requires grad), which
any inserted module must pay as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import statistics
import sys
import time
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # BERT-base, batch 32 x 128: the reference shape
    "bert-base": {"family": "bert", "batch": 32, "seq": 128,
                  "config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                             "intermediate_size": 3072, "vocab_size": 30522}},
    # a 1B-class LLaMA-style decoder (GQA), batch 8 x 512
    "llama-1b": {"family": "llama", "batch": 8, "seq": 512,
                 "config": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                            "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 32000}},
    # a small BERT for the CPU
    "bert-small": {"family": "bert", "batch": 8, "seq": 128,
                   "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                              "intermediate_size": 1024, "vocab_size": 30522}},
    # BERT-base's depth and op count at a width where every op is cheap: on the CPU its step time is
    # mostly per-op overhead (Python, dispatch), the cost that launch-bound GPU steps pay too
    "bert-base-narrow": {"family": "bert", "batch": 4, "seq": 32,
                         "config": {"hidden_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4,
                                    "intermediate_size": 256, "vocab_size": 30522}},
    # the CI smoke shape
    "bert-tiny": {"family": "bert", "batch": 2, "seq": 16,
                  "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 64, "vocab_size": 1000}},
    "llama-tiny": {"family": "llama", "batch": 2, "seq": 16,
                   "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000}},
    # ViT-B/16 at 224 x 224 (196 patches + [CLS]), batch 32: the shape of VPT's and KAdaptation's papers
    "vit-base": {"family": "vit", "batch": 32, "seq": 197, "image": 224,
                 "config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                            "intermediate_size": 3072, "patch_size": 16}},
    "vit-tiny": {"family": "vit", "batch": 2, "seq": 17, "image": 32,
                 "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 64, "patch_size": 8}},
}

# Equal configurations across libraries (same rank, bottleneck, prefix length and placements), as
# functions of the hidden size d. Keys: unipelt's config, peft's config class and kwargs, adapters'.
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"unipelt": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
             "peft": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": "qv"}),
             "adapters": ("LoRAConfig", {"r": 8, "alpha": 16, "attn_matrices": ["q", "v"]})},
    # the same LoRA, trained inside W_q's and W_v's GEMMs (x (W + s B A)^T); its peers are lora's
    "lora_fold": {"unipelt": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"], "fold": True}},
    "prefix": {"unipelt": {"method": "prefix", "length": 10, "reparam": False},
               "peft": ("PrefixTuningConfig", {"num_virtual_tokens": 10, "prefix_projection": False}),
               "adapters": ("PrefixTuningConfig", {"prefix_length": 10, "flat": True})},
    "prefix_mlp": {"unipelt": {"method": "prefix", "length": 10, "reparam": True, "reparam_hidden": 512},
                   "peft": ("PrefixTuningConfig", {"num_virtual_tokens": 10, "prefix_projection": True,
                                                   "encoder_hidden_size": 512}),
                   "adapters": ("PrefixTuningConfig", {"prefix_length": 10, "flat": False, "bottleneck_size": 512})},
    # "tokens": positions the method adds to every layer's sequence; the run also times the floor at that length
    "prompt": {"unipelt": {"method": "prompt", "length": 20, "position": "start"}, "tokens": 20,
               "peft": ("PromptTuningConfig", {"num_virtual_tokens": 20}),
               "adapters": ("PromptTuningConfig", {"prompt_length": 20})},
    "ia3": {"unipelt": {"method": "ia3"},
            "peft": ("IA3Config", {"target_modules": "kvf", "feedforward_modules": "f"}),
            "adapters": ("IA3Config", {})},
    "ln": {"unipelt": {"method": "ln"},
           "peft": ("LNTuningConfig", {"target_modules": "ln"})},
    "pfeiffer": {"unipelt": {"method": "pfeiffer"},
                 "adapters": ("SeqBnConfig", {"reduction_factor": 16})},
    "houlsby": {"unipelt": {"method": "houlsby"},
                "adapters": ("DoubleSeqBnConfig", {"reduction_factor": 16})},
    "parallel": {"unipelt": {"method": "parallel", "bottleneck": "d/2", "scaling": 4.0},
                 "adapters": ("ParBnConfig", {"reduction_factor": 2})},
    "mam": {"unipelt": {"method": "mam", "prefix": {"length": 30, "reparam_hidden": 800},
                        "adapter": {"bottleneck": "d/2"}},
            "adapters": ("MAMConfig", {})},
    # MAM's prefix alone (its adapter alone is "parallel"): what MAM's parts cost apart
    "mam_prefix": {"unipelt": {"method": "prefix", "length": 30, "reparam": True, "reparam_hidden": 800}},
    "unipelt": {"unipelt": {"method": "unipelt"}, "adapters": ("UniPELTConfig", {})},
    # the seed's system: UniPELT with adapters' prompt layer (10 tokens after [CLS], joined after the embeddings)
    "unipelt_prompt": {"unipelt": {"method": "unipelt", "prompt": {"length": 10, "join": "embeddings",
                                                                    "init": "uniform"}},
                       "adapters": ("ConfigUnion", [("UniPELTConfig", {}),
                                                    ("PromptTuningConfig", {"prompt_length": 10,
                                                                            "combine": "prefix_after_bos"})]),
                       "tokens": 10},
    # UniPELT's three parts together with no gates: against "unipelt", the gates' own cost
    "unipelt_ungated": {"unipelt": {"method": "composition", "methods": [
        {"method": "adapter", "placement": "pfeiffer"},
        {"method": "prefix", "length": 10, "reparam": True, "reparam_hidden": 512, "init": "bert"},
        {"method": "lora", "r": 8, "alpha": 2, "targets": ["q", "v"]}]}},
    # adapters' Compacter trains no LayerNorms; the reference's (our default) does: left out here for one function
    "compacter": {"unipelt": {"method": "compacter", "bottleneck": "d/32", "train_layer_norms": False},
                  "adapters": ("CompacterConfig", {})},
    "compacter++": {"unipelt": {"method": "compacter++", "bottleneck": "d/32"}},
    "phm_adapter": {"unipelt": {"method": "phm_adapter", "bottleneck": "d/32"}},
    "krona": {"unipelt": {"method": "krona", "a_out": 32, "a_in": 32}},
    "adapter_bias": {"unipelt": {"method": "adapter_bias"}},
    "krona_ffn": {"unipelt": {"method": "krona_ffn", "a_out": 32, "a_in": 32}},
    "kadaptation": {"unipelt": {"method": "kadaptation"}},
    "sparse_adapter": {"unipelt": {"method": "sparse_adapter", "bottleneck": "d/16"}},  # masks of ones unpruned
    "rational": {"unipelt": {"method": "rational"}},
    "poly": {"unipelt": {"method": "poly"}},
    "poly_s": {"unipelt": {"method": "poly_s"}},
    "poly_mu": {"unipelt": {"method": "poly_mu"}},
    # three frozen source prompts (zero here: their values do not change the cost) and a 20-token target
    "attempt": {"unipelt": {"method": "attempt", "n_sources": 3, "length": 20}, "families": ("bert", "llama"),
                "tokens": 20},
    "vpt": {"unipelt": {"method": "vpt", "length": 10}, "families": ("vit",)},
    "vpt_deep": {"unipelt": {"method": "vpt_deep", "length": 10}, "families": ("vit",)},
}


def applies(method: str, family: str) -> bool:
    """Whether the benchmark runs ``method`` on a model of ``family`` (VPT needs a ViT, ATTEMPT text)."""
    return family in METHODS[method].get("families", (family,))

# module names (regular expressions) of the attention projections, the FFN's output projection W_2 and the
# norms per family, for peft's target_modules; BERT's "output.dense" alone would match the attention's too
PEFT_TARGETS = {
    "bert": {"q": "query", "k": "key", "v": "value", "f": r"\d+\.output\.dense", "ln": "LayerNorm"},
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "f": "down_proj",
              "ln": "input_layernorm|post_attention_layernorm|norm"},
    "vit": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "f": "fc2",
            "ln": "layernorm_before|layernorm_after|layernorm"},
}


def build_base(shape: dict[str, Any], attention: str | None = None) -> torch.nn.Module:
    """The randomly initialised base model (no head, no pooler) for a shape, with the attention
    implementation ``attention`` when given (else the model's own choice)."""
    model = _random_base(shape)
    if attention:
        model.set_attn_implementation(attention)
    return model


def model_class(shape: dict[str, Any]) -> type:
    """The shape's model class. Asking for it makes ``transformers`` import the modelling module, and with
    transformers 5.17 that import leaves one 4-byte tensor behind (made inside a torch module it imports;
    run 39's allocator trace). A case asks before it builds under ``torch.device("cuda")``, so that the
    tensor stays on the CPU instead of counting in the GPU peak of the cases on that version alone."""
    import transformers

    return getattr(transformers, {"bert": "BertModel", "vit": "ViTModel"}.get(shape["family"], "LlamaModel"))


def _random_base(shape: dict[str, Any]) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if shape["family"] == "bert":
        config = transformers.BertConfig(**shape["config"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         max_position_embeddings=max(512, shape["seq"] + 64))
        return model_class(shape)(config, add_pooling_layer=False)
    if shape["family"] == "vit":
        config = transformers.ViTConfig(**shape["config"], image_size=shape["image"], hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
        return model_class(shape)(config, add_pooling_layer=False)
    config = transformers.LlamaConfig(**shape["config"], max_position_embeddings=max(2048, shape["seq"] + 64))
    return model_class(shape)(config)


def _resolve(value: Any, d: int) -> Any:
    if isinstance(value, str) and value.startswith("d/"):
        return d // int(value[2:])
    if isinstance(value, dict):
        return {k: _resolve(v, d) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, d) for v in value]
    return value


def attach(peer: str, method: str, model: torch.nn.Module, family: str) -> torch.nn.Module:
    """Put ``method`` from library ``peer`` on ``model`` and freeze the rest."""
    d = model.config.hidden_size
    if peer == "floor":
        # gradients flow back through every activation down to the embeddings' output (see step_inputs)
        return model.requires_grad_(False)
    if peer == "full":
        return model.requires_grad_(True)
    spec = METHODS[method][peer]
    if peer == "unipelt":
        import unipelt

        return unipelt.attach(model, _resolve(spec, d))
    name, kwargs = spec
    kwargs = _resolve(kwargs if name == "ConfigUnion" else dict(kwargs), d)
    if peer == "peft":
        import peft

        names = PEFT_TARGETS[family]
        for key in ("target_modules", "feedforward_modules"):
            if key in kwargs:
                chosen = [names["ln"]] if kwargs[key] == "ln" else [names[c] for c in kwargs[key]]
                kwargs[key] = rf"(.*\.)?({'|'.join(chosen)})"  # peft full-matches a string against each name
        cls = getattr(peft, name)
        if name in ("PrefixTuningConfig", "PromptTuningConfig"):
            kwargs["task_type"] = "FEATURE_EXTRACTION"
        return peft.get_peft_model(model, cls(**kwargs))
    if peer == "adapters":
        import adapters

        adapters.init(model)
        config = adapters_config(kwargs if name == "ConfigUnion" else [(name, kwargs)])
        model.add_adapter("bench", config=config)
        model.train_adapter("bench")
        return model
    raise ValueError(f"unknown library {peer!r}")


def adapters_config(parts: list) -> Any:
    """An ``adapters`` configuration from ``[(class name, kwargs), ...]``: the one part, or a ``ConfigUnion`` of the
    parts with any union among them flattened (a union does not nest another, and UniPELT's is one)."""
    import adapters

    configs = []
    for name, kwargs in parts:
        part = getattr(adapters, name)(**kwargs)
        configs.extend(part.configs if isinstance(part, adapters.ConfigUnion) else [part])
    return configs[0] if len(configs) == 1 else adapters.ConfigUnion(*configs)


def step_inputs(peer: str, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model call of a training step. The floor gets its word embeddings as a leaf that requires grad
    (``inputs_embeds``), so that gradients run back through every activation while no weight trains; a
    hook setting ``requires_grad`` on the embeddings' output would do the same eagerly but breaks
    ``torch.compile``'s graph there. The floor then skips one embedding lookup, which only lowers it.
    Images (``ids`` of shape (batch, 3, h, w)) go in as ``pixel_values``; the floor's require grad, so its
    backward also runs the patch embedding's input gradient (one small GEMM, which only raises it)."""
    if ids.dim() == 4:
        return {"pixel_values": ids.clone().requires_grad_(True) if peer == "floor" else ids}
    mask = torch.ones_like(ids)
    if peer != "floor":
        return {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    return {"inputs_embeds": embeds.requires_grad_(True), "attention_mask": mask}


def merge(peer: str, method: str, model: torch.nn.Module) -> torch.nn.Module | None:
    """The merged model where the library merges this method, else None."""
    if peer == "adapters" and METHODS[method]["adapters"][0] not in ("LoRAConfig", "IA3Config"):
        return None  # adapters merges only its LoRA-style methods (merge_adapter leaves others in place)
    try:
        if peer == "unipelt":
            import warnings

            import unipelt

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not mergeable, kept as deltas": checked below
                merged = unipelt.merge(model)
            return None if unipelt.core.deltas(merged) else merged  # merged only if nothing stayed a delta
        if peer == "peft":
            return model.merge_and_unload()
        if peer == "adapters":
            model.merge_adapter("bench")
            return model
    except (ValueError, AttributeError, NotImplementedError, TypeError):
        return None
    return None


def virtual_tokens(peer: str, method: str) -> int:
    """Positions a library prepends to the outputs (peft's and adapters' prompt tuning return the prompt's
    states too; ours returns the real tokens' only)."""
    if method == "prompt" and peer == "peft":
        return METHODS[method]["peft"][1]["num_virtual_tokens"]
    if method == "prompt" and peer == "adapters":
        return METHODS[method]["adapters"][1]["prompt_length"]
    if method == "unipelt_prompt" and peer == "adapters":  # after [CLS]: the same count of states, one of them [CLS]
        return METHODS[method]["tokens"]
    return 0


def hidden(output: Any, skip: int = 0) -> torch.Tensor:
    """The real tokens' final states (every case's loss is a function of these alone)."""
    states = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return states[:, skip:] if skip else states


def loss_direction(model: torch.nn.Module, inputs: dict[str, torch.Tensor], skip: int = 0) -> torch.Tensor:
    """A fixed random direction of the final states (one eager forward without gradients finds their shape;
    call it before ``torch.compile``). Every case's loss is ``(states * direction).mean()``: not the states'
    mean square, which after a LayerNorm (gain 1, bias 0, as in a random model) is a constant, so its
    gradients would be rounding noise."""
    with torch.no_grad():
        states = hidden(model(**inputs), skip)
    return torch.randn(states.shape, generator=torch.Generator().manual_seed(11)).to(states.device)


def count_ops(fn) -> int:
    """ATen operations one call of ``fn`` dispatches (views included): each costs the CPU a dispatch and
    most a kernel launch, so at small batches this count is what a step's overhead scales with."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def kernel_profile(fn, steps: int = 3, top: int = 12) -> dict[str, Any]:
    """GPU kernels of ``steps`` calls of ``fn`` under the torch profiler: launches and busy time per call,
    and the kernels that take the most time. A step much longer than its busy time waits on the CPU
    (launch-bound): fewer ops help it; a busy GPU needs fewer FLOPs or bytes instead."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        # kernels only: a user annotation (the optimizer's "Optimizer.step#AdamW.step") spans others
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False) \
                and "#" not in event.name:
            kernels.setdefault(event.name, []).append(event.time_range.elapsed_us())
    busy = sum(sum(t) for t in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"kernels_per_step": sum(len(t) for t in kernels.values()) / steps,
            "gpu_busy_ms": busy / steps / 1e3,
            "top_kernels": [[name[:90], len(t) / steps, sum(t) / steps / 1e3] for name, t in ranked]}


def report_gpu_rows(rows: list[dict[str, Any]], table: str, out: str | None) -> None:
    """Print a GPU micro-benchmark's ``table`` under the GPU's name and torch's version, and write ``rows`` with
    them to ``out`` (JSON) when given."""
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}\n\n{table}")
    if out:
        with open(out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)


def random_batch(shape: dict[str, Any]) -> torch.Tensor:
    """The benchmark's seeded input batch for ``shape``: token ids, or images (batch, 3, h, w) for a ViT."""
    generator = torch.Generator().manual_seed(1)
    if shape["family"] == "vit":
        return torch.randn(shape["batch"], 3, shape["image"], shape["image"], generator=generator)
    return torch.randint(5, shape["config"]["vocab_size"], (shape["batch"], shape["seq"]), generator=generator)


def timed(fn, steps: int, warmup: int, cuda: bool, back_to_back: bool = False,
          host_ms: list[float] | None = None) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones: CUDA events on a GPU
    (the GPU's time from the first kernel launched to the last finished), the wall clock on the CPU.

    Each call starts after the last one finished, so the GPU also waits out the host's work before its
    first kernel. ``back_to_back`` (GPU): no synchronisation between calls, as in a training loop; one
    event between consecutive calls, so each time is a call's share of the stream once the host runs
    ahead (host work hides behind the GPU's as far as the GPU has work queued). There ``host_ms``, when
    given, receives each call's host time: a step whose host time reaches its stream time is host-bound.
    (Unless the launch queue is full: an eager step of many kernels can wait on it, a compiled step, a few
    CUDA graph replays, does not.)
    """
    for _ in range(warmup):
        fn()
    if cuda and back_to_back:
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        before = time.perf_counter()
        for event in events[1:]:
            fn()
            event.record()
            after = time.perf_counter()
            if host_ms is not None:
                host_ms.append((after - before) * 1e3)
            before = after
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def set_inductor_options(options: dict[str, Any]) -> None:
    """Set ``torch._inductor.config`` entries by dotted name (``{"triton.cudagraph_trees": False}``)."""
    import torch._inductor.config as inductor_config

    for name, value in options.items():
        *path, leaf = name.split(".")
        owner = inductor_config
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, leaf):
            raise KeyError(f"torch._inductor.config has no option {name!r}")
        setattr(owner, leaf, value)


class _Messages(logging.Handler):
    """Collects the warnings of one logger (the reasons CUDA graphs were skipped)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])


def watch_cudagraph_skips() -> _Messages:
    """Hear why Inductor ran a graph without CUDA graphs (``reduce-overhead``): such a graph launches each
    kernel from the host every step, which can make a step host-bound. torch logs each reason once, on a
    logger that is silent unless ``TORCH_LOGS`` names it; its warnings reach a handler set on it directly."""
    from torch._inductor import cudagraph_utils

    heard = _Messages()
    cudagraph_utils.cudagraphs_log.addHandler(heard)
    return heard


def longer_floor_tokens(peer: str, method: str) -> int:
    """A floor case named ``+N`` is the frozen model at N positions more than the shape's sequence (0 else)."""
    return int(method[1:]) if peer == "floor" and method.startswith("+") else 0


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    shape = SHAPES[spec["shape"]]
    extra = longer_floor_tokens(spec["peer"], spec["method"])
    if extra:  # its loss reads the last ``seq`` positions, as the prompt cases' read the real tokens'
        shape = {**shape, "seq": shape["seq"] + extra}
    if spec.get("inductor"):
        set_inductor_options(spec["inductor"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    model_class(shape)  # loaded outside the device context (see model_class)
    with torch.device(device):  # random init where the model runs: seconds less per case on a GPU
        model = build_base(shape, spec.get("attention"))
    model = attach(spec["peer"], spec["method"], model, shape["family"]).to(device)
    inputs = step_inputs(spec["peer"], model, random_batch(shape).to(device))
    skip = extra or virtual_tokens(spec["peer"], spec["method"])
    direction = loss_direction(model, inputs, skip)
    compile_mode = None if spec.get("compile") in (None, "default") else spec["compile"]
    whole_step = spec.get("compile") and spec.get("compile_scope", "model") == "step"
    skips = watch_cudagraph_skips() if spec.get("compile") else None
    if spec.get("compile") and not whole_step:
        model = torch.compile(model, mode=compile_mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    counted = sum(p.numel() for p in trainable)
    # foreach (default): the multi-tensor update GPUs use by default, also on the CPU (like for like across
    # devices); fused: one kernel for all tensors of a dtype, less host work per trainable tensor
    kind = {"fused": True} if spec.get("optimizer") == "fused" else {"foreach": True}
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, **kind) if trainable else None
    leaves = [t for t in inputs.values() if t.requires_grad]  # the floor's: its gradient is dropped every step
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def train_step() -> float:
        with autocast():
            loss = (hidden(model(**inputs), skip).float() * direction).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for leaf in leaves:
            leaf.grad = None
        return loss

    if whole_step:
        # forward, backward (compiled autograd: the gradient accumulation inside its graph) and the optimizer
        # as compiled graphs, each one CUDA graph under reduce-overhead: the host replays a few graphs a step
        torch._dynamo.config.compiled_autograd = True
        train_step = torch.compile(train_step, mode=compile_mode)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    if spec.get("untimed"):  # a prewarm: compile, run one step, nothing to measure
        train_step()
        return {"peer": spec["peer"], "method": spec["method"], "untimed": True}
    first = time.perf_counter()
    train_step()  # compiles, under torch.compile: its time and the compile caches' hits are reported
    first_step_s = time.perf_counter() - first
    train_ms = timed(train_step, spec["steps"], spec["warmup"], cuda)
    host_ms: list[float] = []
    back_to_back_ms = timed(train_step, spec["steps"], 2, cuda, back_to_back=True, host_ms=host_ms) if cuda else None
    peak_requested = None
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        # the tensors' own bytes: max_memory_allocated counts the allocator's blocks, which hold a request
        # rounded up to 512 bytes, and a whole cached block when what would be left of it is under 1 MB
        peak_requested = torch.cuda.memory_stats().get("requested_bytes.all.peak", 0) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    loss = float(train_step().detach())
    compiled = bool(spec.get("compile"))
    compile_report = {}
    if compiled:
        from torch._dynamo.utils import counters

        compile_report = {"first_step_s": first_step_s,
                          "compile_cache": {f"{group}.{k}": v for group in ("inductor", "aot_autograd")
                                            for k, v in counters[group].items() if "cache" in k},
                          "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                          "cudagraph_skip_reasons": sorted(set(skips.messages))}
    # under torch.compile a dispatch mode or eval/no-grad would each trigger another compilation: a compiled
    # case measures training only
    ops = None if compiled else count_ops(train_step)
    profiled = {}
    if cuda and spec.get("profile"):
        try:
            profiled = kernel_profile(train_step, top=spec.get("top_kernels", 12))
        except Exception as error:  # noqa: BLE001 (a profiler failure must not lose the case's timings)
            profiled = {"profile_error": str(error)[:200]}
    result = {"peer": spec["peer"], "method": spec["method"], "shape": spec["shape"], "device_kind": device,
              "compile": spec.get("compile"), "compile_scope": "step" if whole_step else "model",
              "inductor": spec.get("inductor") or {}, "attention": spec.get("attention"),
              "optimizer": spec.get("optimizer", "foreach"),
              # the CUDA allocator's settings (inherited from the benchmark's environment): they change how
              # max_memory_allocated counts, e.g. expandable_segments:True splits every cached block
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "train_ms": statistics.median(train_ms), "train_ms_all": train_ms,
              "back_to_back_ms": statistics.median(back_to_back_ms) if back_to_back_ms else None,
              "host_ms": statistics.median(host_ms) if host_ms else None,
              "seq": shape["seq"], "tokens_per_s": shape["batch"] * shape["seq"] / (statistics.median(train_ms) / 1e3),
              "peak_mb": peak, "peak_requested_mb": peak_requested, "infer_ms": None, "ops_per_step": ops,
              "ops_per_inference": None, "merged_infer_ms": None, "trainable": counted, "loss": loss, **profiled,
              **compile_report}
    if compiled:
        return result

    def infer(m: torch.nn.Module):
        def run() -> None:
            with torch.no_grad(), autocast():
                m(**inputs)
        return run

    model.eval()
    result["infer_ms"] = statistics.median(timed(infer(model), spec["steps"], spec["warmup"], cuda))
    result["ops_per_inference"] = count_ops(infer(model))
    if spec["peer"] not in ("floor", "full"):
        merged = merge(spec["peer"], spec["method"], model)
        if merged is not None:
            result["merged_infer_ms"] = statistics.median(timed(infer(merged), spec["steps"], spec["warmup"], cuda))
    return result


def dump(spec: dict[str, Any]) -> dict[str, Any]:
    """For the equivalence tests: the base weights, the library's randomised delta, inputs and outputs.

    The file lets another process (another ``transformers``) rebuild the same function with unipelt.
    """
    shape = SHAPES[spec["shape"]]
    base = build_base(shape)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach(spec["peer"], spec["method"], base, shape["family"])
    torch.manual_seed(3)
    delta = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)  # away from the identity init, so a misplaced delta shows
                delta[name] = p.detach().clone()
    ids = torch.randint(5, shape["config"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    model.eval()
    with torch.no_grad():
        out = hidden(model(input_ids=ids, attention_mask=mask), virtual_tokens(spec["peer"], spec["method"]))
    torch.save({"base": base_state, "delta": delta, "input_ids": ids, "attention_mask": mask, "output": out},
               spec["dump"])
    return {"dump": spec["dump"], "delta_names": sorted(delta)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    print(json.dumps(dump(spec) if spec.get("dump") else measure(spec)), flush=True)


if __name__ == "__main__":
    main()
