"""Fuzzing method configs: every method and preset, random values of every key, nested compositions.

Each generated config, given to ``unipelt.attach`` on a tiny model, either attaches, and then the model runs
forward and backward, saves and loads into a fresh model with equal outputs; or it is refused with one of the
library's errors (``ConfigError``, ``UnsupportedModelError``, ``DeltaFileError`` for a config naming delta
folders) whose message is one non-empty line, and the model is left as it was. Any other exception is a bug.

The strategies are read from the config dataclasses themselves (each field's type hint and default), so a new
method or key is fuzzed without touching this file. Values: good ones of the field's type (small sizes, the
choices the method's module lists), edge ones (0, negatives, huge, NaN, infinity, empty tuples, unknown
targets) and ones of the wrong type; UniPELT's and MAM's parts on, off, ``None`` or partial dicts; compositions
of any of the above, nested.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
import types
import typing
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unipelt
from conftest import FAMILIES, inputs
from fuzz_support import LIBRARY_ERRORS, check_message, examples, fresh, record, untouched
from unipelt.config import GATE_POOLINGS, MethodConfig
from unipelt.registry import registry

REGISTRY = registry()
NAMES = sorted(REGISTRY)
ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
# text families with each kind of attention layout (separate q/k/v, GPT-2's fused Conv1D, GQA, encoder-decoder),
# and the vision family
CONFIG_FAMILIES = ("bert", "gpt2", "llama", "t5", "vit")
assert set(CONFIG_FAMILIES) <= set(FAMILIES)

SETTINGS = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type[MethodConfig]) -> list[tuple[str, Any, Any]]:
    """``(name, type hint, default)`` of each field of a config class."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((f.name, hints.get(f.name, Any), default))
    return out


def _module_strings(cls: type, name: str) -> list[str]:
    """Likely choices of a string field: the strings the config's modules list in their constants (placements,
    inits, routings...); the gate poolings and activations for those fields."""
    if name == "gate_pooling":
        return list(GATE_POOLINGS)
    if name == "activation":
        return ["relu", "gelu", "silu", "swish", "tanh"]
    found: set[str] = set()
    for klass in cls.__mro__:
        module = sys.modules.get(getattr(klass, "__module__", ""))
        for key, value in vars(module).items() if module else ():
            if key.startswith("__"):  # __builtins__, __all__
                continue
            # tuples of choices, or dicts keyed by them
            if isinstance(value, (tuple, list, frozenset, set, dict)) and value \
                    and all(isinstance(v, str) for v in value):
                found.update(value)
    return sorted(s for s in found if len(s) < 24 and "." not in s and "/" not in s and " " not in s)


WRONG_TYPES = st.sampled_from(["x", "", [1], {"a": 1}, None, 1.5, True, -3, [], ()])


def _base_types(hint: Any) -> tuple[set[type], bool]:
    """The plain types a hint allows, and whether it allows None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        plain = {typing.get_origin(a) or a for a in args if a is not type(None)}
        return plain, type(None) in args
    return {typing.get_origin(hint) or hint}, False


def _config_class_of(hint: Any) -> type[MethodConfig] | None:
    for t in _base_types(hint)[0]:
        if isinstance(t, type) and issubclass(t, MethodConfig):
            return t
    return None


def value_strategy(cls: type[MethodConfig], name: str, hint: Any, default: Any, depth: int,
                   kind: str = "any") -> st.SearchStrategy:
    """Values for one field: good ones of its type (``kind="good"``), edge and wrong ones (``"bad"``), or any."""
    part = _config_class_of(hint)
    if part is not None:  # a UniPELT / MAM part: on, off, None, partial dict, an object
        if kind == "bad":
            return st.sampled_from(["adapter", 1, [], {"bogus_key": 1}, part.__mro__[1]()])
        return st.one_of(st.sampled_from([None, True, False, {}]), part_dict(part, depth + 1),
                         part_dict(part, depth + 1).map(lambda d: _object(part, d)))
    if name == "methods":  # a composition's list
        if kind == "bad":
            return st.sampled_from([[], "lora", None, [None], [{"r": 4}], {"method": "lora"}, 3])
        return st.lists(config_strategy(depth + 1), min_size=1, max_size=3)
    plain, nullable = _base_types(hint)
    good: list[st.SearchStrategy] = []
    edge: list[Any] = [default]
    if nullable:
        edge.append(None)
    if bool in plain:
        good.append(st.booleans())
        edge += [0, 1, "true"]
    elif int in plain:
        good.append(st.integers(1, 8))
        edge += [0, -1, -(2 ** 31), 2 ** 62, 3.0, 2.5, True, float("nan")]
    elif float in plain:
        good.append(st.floats(0.0, 2.0, allow_nan=False))
        good.append(st.sampled_from([0.0, 0.5, 1, 4.0]))
        edge += [-1.0, -1e-9, 1.0, 0.999999, 1e6, float("nan"), float("inf"), float("-inf"), True]
    if str in plain:
        good.append(st.sampled_from(_module_strings(cls, name) + ([default] if isinstance(default, str) else [])))
        edge += ["", "bogus", "Relu ", 3]
    if tuple in plain:  # targets, sources
        if name == "sources":
            good.append(st.sampled_from([(), ("no/such/folder",)]))
        else:
            good.append(st.lists(st.sampled_from(ROLES + ("query", "ffn")), min_size=1, max_size=4, unique=True)
                        .map(tuple))
            edge += [(), ("bogus",), ("q", "q"), "q", "qv", [1], ("q", None), ["k", "v"]]
    good = good or [st.just(default)]
    if kind == "good":
        return st.one_of(*good)
    if kind == "bad":
        return st.one_of(st.sampled_from(edge), WRONG_TYPES)
    return st.one_of(*good, *good, st.sampled_from(edge), WRONG_TYPES)


def _object(cls: type[MethodConfig], data: dict[str, Any]) -> Any:
    """A config object built from ``data`` without validation (as a user's ``LoRAConfig(r=-1)``)."""
    try:
        return cls(**{k: v for k, v in data.items() if k != "method"})
    except TypeError:  # an unknown key: the dataclass' own constructor refuses it, as Python does
        return data


@st.composite
def part_dict(draw, cls: type[MethodConfig], depth: int) -> dict[str, Any]:
    """Some of ``cls``'s fields with fuzzed values: all good ones, one bad one among good ones, or any values
    (an unknown key now and then)."""
    # a third of the keys each time, and always those without which the defaults are refused (a composition's
    # methods, ATTEMPT's sources)
    chosen = [f for f in _fields(cls) if f[0] in ("methods", "n_sources") or draw(st.sampled_from(range(3))) == 1]
    mode = draw(st.sampled_from(["clean", "clean", "one_bad", "one_bad", "chaos"]))
    bad = draw(st.integers(0, len(chosen) - 1)) if chosen and mode == "one_bad" else -1
    out: dict[str, Any] = {}
    for i, (name, hint, default) in enumerate(chosen):
        kind = "any" if mode == "chaos" else "bad" if i == bad else "good"
        out[name] = draw(value_strategy(cls, name, hint, default, depth, kind))
    if draw(st.sampled_from(range(25))) == 13:  # not 0: hypothesis draws its simplest values often
        out["bogus_key"] = 1
    return out


@st.composite
def config_strategy(draw, depth: int = 0, name: str | None = None) -> Any:
    """A config of method ``name`` (any when None) in any form ``attach`` takes: a name, a dict with ``method``,
    or an object. Compositions nest two levels deep."""
    if name is None:
        names = NAMES if depth < 2 else [n for n in NAMES if REGISTRY[n].module_class is not None]
        name = draw(st.sampled_from(names))
    cls = REGISTRY[name].config_class
    form = draw(st.sampled_from(range(10)))
    if form == 9:
        return name
    data = {"method": name, **draw(part_dict(cls, depth))}
    if form == 8:  # a method key that names nothing
        data["method"] = draw(st.sampled_from([["lora"], {"method": "lora"}, None, 5, "LORA", "", name.upper()]))
    if form == 1 and REGISTRY[name].preset is None:
        return _object(cls, data)
    return data


def families_for(name: str | None) -> st.SearchStrategy[str]:
    """Tiny families to try ``name`` on: vision methods mostly on the ViT, the others on every family."""
    if name is not None and name.startswith("vpt"):
        return st.sampled_from(["vit", "vit", "vit", "bert"])
    return st.sampled_from(CONFIG_FAMILIES)


@st.composite
def cases(draw, name: str | None = None) -> tuple[str, Any]:
    config = draw(config_strategy(name=name))
    return draw(families_for(name)), config


def _describe(config: Any) -> str:
    return config.to_dict() if isinstance(config, MethodConfig) else repr(config)[:400]


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def _batch(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    batch = inputs(family)
    methods = unipelt.core.deltas(model).values() if "_unipelt" in model.__dict__ else ()
    if any(getattr(m, "uses_task_ids", False) for m in methods):
        batch["task_ids"] = torch.zeros(batch[next(iter(batch))].shape[0], dtype=torch.long)
    return batch


def run_config_case(family: str, config: Any) -> str:
    """One case: attach ``config`` to a tiny ``family`` model and use it, or check the refusal. Returns the
    outcome ("attached" or the error's type); any other exception propagates (a bug)."""
    model = fresh(family)
    batch = inputs(family)
    with torch.no_grad():
        base = _outputs(model, batch)
    try:
        unipelt.attach(model, config)
    except LIBRARY_ERRORS as e:
        check_message(e)
        assert untouched(model), f"a refused config left an attachment on the model: {e}"
        with torch.no_grad():
            assert torch.equal(_outputs(model, batch), base), "a refused config changed the model's outputs"
        return type(e).__name__
    # attached: forward + backward in training mode, finite outputs and gradients
    batch = _batch(model, family)
    model.train()
    out = _outputs(model, batch)
    assert torch.isfinite(out).all(), f"an accepted config gives non-finite outputs: {_describe(config)}"
    out.float().square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained, "an attached method trains no parameter"
    for p in trained:
        assert p.grad is None or torch.isfinite(p.grad).all(), "non-finite gradient"
    model.eval()
    with torch.no_grad():
        out = _outputs(model, batch)
    with tempfile.TemporaryDirectory(prefix="unipelt-fuzz-") as folder:
        unipelt.save(model, folder)
        loaded = fresh(family)
        unipelt.load(loaded, folder)
    loaded.eval()
    with torch.no_grad():
        again = _outputs(loaded, _batch(loaded, family))
    torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)
    return "attached"


def check_case(family: str, config: Any) -> None:
    try:
        outcome = run_config_case(family, config)
    except AssertionError:
        raise
    except LIBRARY_ERRORS as e:  # raised after attach: forward, save or load of an accepted config
        raise AssertionError(f"{family}: {_describe(config)} attached but then failed: {type(e).__name__}: {e}") from e
    record("configs", outcome)


@pytest.mark.parametrize("name", NAMES)
@settings(SETTINGS, max_examples=examples(10))
@given(data=st.data())
def test_fuzzed_method_configs(name: str, data) -> None:
    """Every method and preset: its keys with good, edge and wrong values, on the tiny families."""
    check_case(*data.draw(cases(name), label="family, config"))


@settings(SETTINGS, max_examples=examples(60))
@given(case=cases("composition"))
def test_fuzzed_compositions(case) -> None:
    """Free compositions of any configs, UniPELT and MAM among them, nested."""
    check_case(*case)


@settings(SETTINGS, max_examples=examples(100))
@given(case=cases())
def test_fuzzed_any_config(case) -> None:
    check_case(*case)


# --------------------------------------------------------------------------- the field strategies themselves


def test_every_registered_name_is_fuzzed() -> None:
    """The strategies cover every method and preset, and every field of every config class has values."""
    assert set(NAMES) == set(unipelt.methods())
    for name in NAMES:
        cls = REGISTRY[name].config_class
        for field_name, hint, default in _fields(cls):
            value_strategy(cls, field_name, hint, default, 0)  # builds without error for every field


def _fuzz_finds() -> list[tuple[str, Any, str]]:
    """The distinct failures the fuzz found, each as ``(family, config, outcome now)``; before its fix each raised
    something other than a library error (or attached and then failed), as the comment says."""
    from unipelt.methods.adapter import AdapterConfig
    from unipelt.methods.prefix import PrefixConfig
    from unipelt.methods.prompt import PromptConfig

    return [
        ("gpt2", {"method": "unipelt", "prompt": False}, "attached"),  # AttributeError: 'bool' ... 'method'
        ("t5", {"method": "unipelt_legacy", "prefix": False}, "attached"),  # AttributeError: ... 'gate_pooling'
        ("bert", {"method": "unipelt", "adapter": "houlsby"}, "ConfigError"),  # AttributeError
        ("llama", {"method": "unipelt_legacy", "prompt": PromptConfig(join=None)}, "ConfigError"),  # load failed
        ("vit", {"method": "mam", "prefix": PrefixConfig(init="")}, "ConfigError"),  # attached, load failed
        ("vit", {"method": "mam_glue", "prefix": PrefixConfig(reparam_hidden={"a": 1})}, "ConfigError"),  # TypeError
        ("vit", {"method": "mam", "adapter": AdapterConfig(dropout=1.09)}, "ConfigError"),  # ValueError (nn.Dropout)
        ("gpt2", {"method": "poly_mu", "default_task": [1]}, "ConfigError"),  # TypeError: '<=' int and list
        ("t5", {"method": "poly_mu", "tasks": 2, "alpha": []}, "ConfigError"),  # TypeError: list / int
        ("bert", {"method": "krona", "targets": [1]}, "ConfigError"),  # TypeError in sites.projections
        ("vit", {"method": "krona", "targets": 1.5}, "ConfigError"),  # TypeError: 'float' is not iterable
        ("bert", {"method": "kadaptation", "targets": ["q", None]}, "ConfigError"),  # AttributeError: None.replace
        ("bert", {"method": "krona", "gate": True, "scale": [1]}, "ConfigError"),  # TypeError in the forward
        ("llama", {"method": "pfeiffer", "scaling": ""}, "ConfigError"),  # TypeError in the forward
        ("vit", {"method": "parallel", "dropout": []}, "ConfigError"),  # TypeError: '<=' float and list
        ("gpt2", {"method": "lora", "dropout": {"a": 1}}, "ConfigError"),  # TypeError: '<=' float and dict
        ("bert", {"method": "compacter", "activation": {"a": 1}}, "ConfigError"),  # TypeError: unhashable dict
        ("bert", {"method": "prompt", "seed": ""}, "ConfigError"),  # RuntimeError: manual_seed expected a long
        ("vit", {"method": "vpt_deep", "seed": float("nan")}, "ConfigError"),  # RuntimeError: manual_seed
        ("t5", {"method": "attempt", "n_sources": None}, "ConfigError"),  # TypeError: '<' NoneType and int
        ("gpt2", {"method": "parallel", "scaling": float("inf")}, "ConfigError"),  # attached: non-finite outputs
        ("bert", {"method": "poly_mu", "skills": 1, "alpha": float("inf")}, "ConfigError"),  # non-finite outputs
        ("gpt2", {"method": "compacter", "scaling": float("nan")}, "ConfigError"),  # non-finite outputs
        ("vit", {"method": "compacter", "bottleneck": 2 ** 62}, "ConfigError"),  # RuntimeError: storage overflowed
        ("gpt2", {"method": "kadaptation", "rule_rank": 2 ** 62}, "ConfigError"),  # RuntimeError: overflowed
        ("gpt2", {"method": "attempt", "n_sources": 8}, "ConfigError"),  # IndexError: 100 prompt > 64 positions
        ("bert", {"method": ["lora"]}, "ConfigError"),  # TypeError: unhashable type: 'list'
        ("bert", {"method": "composition", "methods": None}, "ConfigError"),  # TypeError: list(None)
    ]


@pytest.mark.parametrize("family,config,outcome", _fuzz_finds(), ids=lambda v: str(v)[:40])
def test_fuzz_finds_stay_fixed(family: str, config: Any, outcome: str) -> None:
    assert run_config_case(family, copy.deepcopy(config)) == outcome


def test_prompt_longer_than_the_positions_is_named() -> None:
    """A prompt that fills GPT-2's learned positions is refused at attach; an input too long for what is left is
    refused at the call, both naming the sizes (an IndexError deep in the embedding before)."""
    with pytest.raises(unipelt.ConfigError, match="length 64 leaves no room"):
        unipelt.attach(fresh("gpt2"), {"method": "prompt", "length": 64})
    model = unipelt.attach(fresh("gpt2"), {"method": "prompt", "length": 60})
    with pytest.raises(unipelt.ConfigError, match="truncate inputs to 4 tokens"):
        model(**inputs("gpt2"))
