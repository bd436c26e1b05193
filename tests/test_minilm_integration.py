"""Integration on the real pretrained default model (all-MiniLM-L6-v2, shipped by a package, offline)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import unipelt
from unipelt.models import default_model_path


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(default_model_path())
    return dict(tok(["a gripping, beautifully shot film", "dull and far too long"], padding=True,
                    return_tensors="pt"))


@pytest.mark.parametrize("method", ["lora", "unipelt", {"method": "unipelt", "prompt": {"length": 10}}, "ia3"])
def test_minilm_attach_train_save_load_merge(tmp_path, batch, method) -> None:
    model = _base()
    with torch.no_grad():
        base_logits = model(**batch).logits
    unipelt.attach(model, method)
    counts = unipelt.trainable_parameters(model)
    # the prefix reparametrisation MLP makes UniPELT about 11% of MiniLM while training; saving drops it
    assert 0 < counts["total"] < 0.15 * sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.tensor([1, 0])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        tuned = model(**batch).logits
    assert not torch.allclose(tuned, base_logits)
    unipelt.save(model, tmp_path / "delta")
    fresh = unipelt.load(_base(), tmp_path / "delta")
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, tuned, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unipelt.merge(fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, tuned, atol=1e-5)


def test_rational_units_keep_the_pretrained_model(batch) -> None:
    """MiniLM's FFN inputs reach -17 to 24, far beyond the fit range: the units must still leave the model's
    states almost unchanged at init (without the straight tails they moved by 66%, and training failed)."""
    model = _base()
    with torch.no_grad():
        before = model.bert(**batch).last_hidden_state
    unipelt.attach(model, "rational")
    with torch.no_grad():
        after = model.bert(**batch).last_hidden_state
    assert float((after - before).norm() / before.norm()) < 0.02


def test_prompt_tuning_alone_learns_on_minilm() -> None:
    """30 steps of a 4-token prompt, head frozen, separate positive from negative sentences."""
    tok = AutoTokenizer.from_pretrained(default_model_path())
    pos = ["a wonderful, moving film", "great acting and a clever plot", "i loved every minute",
           "beautiful and funny", "a triumph", "brilliant and warm", "the best film this year", "charming"]
    neg = ["a dull, tedious mess", "boring and far too long", "i hated every minute", "ugly and stupid",
           "a disaster", "lifeless and cold", "the worst film this year", "tiresome and annoying"]
    enc = dict(tok(pos + neg, padding=True, return_tensors="pt"))
    labels = torch.tensor([1] * 8 + [0] * 8)
    model = _base()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)  # a frozen head the prompt can move
    unipelt.attach(model, {"method": "prompt", "length": 4}, train_head=False)
    assert set(unipelt.trainable_parameters(model)) == {"prompt", "head", "total"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(31):
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses
