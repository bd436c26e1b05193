"""Tiny randomly initialised models of every supported family, and inputs for them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every session compiles afresh: a cache left by an earlier run would skip Inductor's code generation and
# hide a failure there (a fresh clone's CI found one that the warm cache here had masked)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="unipelt-tests-inductor-")  # removed at exit
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE.name
transformers.logging.set_verbosity_error()

VOCAB = 96
HIDDEN = 32
SEQ = 7
BATCH = 3


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "encoder", "decoder", "seq2seq", "vision"


def _text(cls_name: str, config_name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        config = getattr(transformers, config_name)(**kw)
        config.num_labels = 3
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        return getattr(transformers, cls_name)(config).eval()

    return build


_BERT = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)

FAMILIES: dict[str, Family] = {
    "bert": Family("bert", _text("BertForSequenceClassification", "BertConfig", **_BERT), "encoder"),
    "roberta": Family("roberta", _text("RobertaForSequenceClassification", "RobertaConfig", **_BERT,
                                       pad_token_id=1), "encoder"),
    "distilbert": Family("distilbert", _text("DistilBertForSequenceClassification", "DistilBertConfig", dim=HIDDEN,
                                             n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                                             max_position_embeddings=64), "encoder"),
    "deberta-v2": Family("deberta-v2", _text("DebertaV2ForSequenceClassification", "DebertaV2Config", **_BERT),
                         "encoder"),
    "electra": Family("electra", _text("ElectraForSequenceClassification", "ElectraConfig", embedding_size=HIDDEN,
                                       **_BERT), "encoder"),
    "gpt2": Family("gpt2", _text("GPT2ForSequenceClassification", "GPT2Config", n_embd=HIDDEN, n_layer=2, n_head=4,
                                 vocab_size=VOCAB, n_positions=64), "decoder"),
    "llama": Family("llama", _text("LlamaForCausalLM", "LlamaConfig", hidden_size=HIDDEN, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   vocab_size=VOCAB, max_position_embeddings=64), "decoder"),
    "t5": Family("t5", _text("T5ForConditionalGeneration", "T5Config", d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2,
                             num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0), "seq2seq"),
    "bart": Family("bart", _text("BartForSequenceClassification", "BartConfig", d_model=HIDDEN, encoder_layers=2,
                                 decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                                 max_position_embeddings=64), "seq2seq"),
    "vit": Family("vit", _text("ViTForImageClassification", "ViTConfig", hidden_size=HIDDEN, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8,
                               num_channels=3), "vision"),
}


@torch.no_grad()
def perturb_(params: Iterable[torch.Tensor], seed: int, scale: float, draw_in_dtype: bool = False) -> None:
    """Add seeded N(0, scale^2) noise to each tensor in place: deltas leave their zero start, so every part
    of a delta shapes the output. The noise is drawn in float32, or in each tensor's dtype."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype if draw_in_dtype else torch.float32) * scale)


def benchmark_script(name: str):
    """One of benchmarks/*.py, imported as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[name].build()


def inputs(name: str, seed: int = 1, padded: bool = True) -> dict[str, torch.Tensor]:
    """A batch for family ``name``; the last row is padded when ``padded``."""
    g = torch.Generator().manual_seed(seed)
    kind = FAMILIES[name].kind
    if kind == "vision":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        mask[-1, -2:] = 0
        pad = 1 if name == "roberta" else 0
        ids[-1, -2:] = pad
    batch = {"input_ids": ids, "attention_mask": mask}
    if name == "bart":
        # BART's classification head reads each row's last EOS token (id 2); padding id is 1.
        ids[:, -1] = 2
        if padded:
            ids[-1, -3], ids[-1, -2:] = 2, 1
    if kind == "seq2seq" and name == "t5":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 4), generator=g)
    return batch


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits


def load_with_peft(name: str, folder) -> torch.nn.Module:
    """``peft.PeftModel.from_pretrained`` on a fresh base of family ``name``; fails on any missing or
    unexpected adapter key (peft only warns about them)."""
    import warnings

    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(build(name), folder).eval()
    problems = [str(w.message) for w in caught if "adapter keys" in str(w.message) or "missing" in str(w.message)]
    assert not problems, problems
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The models here are tiny: intra-op threads only add overhead (up to 25x on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def step(model: torch.nn.Module, family: str) -> None:
    """One AdamW step (lr 1e-2) on a cross-entropy loss against random targets, over every parameter."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(**inputs(family)).logits
    flat = out.reshape(-1, out.shape[-1])
    targets = torch.randint(0, out.shape[-1], (flat.shape[0],), generator=torch.Generator().manual_seed(3))
    torch.nn.functional.cross_entropy(flat, targets).backward()
    opt.step()
    model.eval()


def pytest_terminal_summary(terminalreporter) -> None:
    """The fuzz suites' count of cases tried, by suite and outcome (tests/fuzz_support.py), when they ran."""
    import sys

    fuzz = sys.modules.get("fuzz_support")
    if fuzz is None or not fuzz.CASES:
        return
    terminalreporter.section("fuzz cases tried")
    for suite, n in sorted(fuzz.CASES.items()):
        outcomes = ", ".join(f"{o} {c}" for (s, o), c in sorted(fuzz.OUTCOMES.items()) if s == suite)
        terminalreporter.write_line(f"{suite}: {n} ({outcomes})")
    terminalreporter.write_line(f"total: {sum(fuzz.CASES.values())}")
