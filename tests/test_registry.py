"""The registry: one registration per method (config, module, name, presets), checked at import, no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import unipelt
from conftest import build, inputs, logits
from unipelt import registry as reg
from unipelt.compositions import expand
from unipelt.config import MethodConfig, Registered, parse_config
from unipelt.methods import METHOD_CLASSES, DeltaMethod, LoRA
from unipelt.registry import Preset, RegistrationError, register_composition, register_method

SRC = Path(unipelt.__file__).parent
NEEDS = {"attempt": {"n_sources": 2, "length": 4},  # values a name cannot go without: attempt's source prompts,
         "composition": {"methods": ["lora", "bitfit"]},  # a composition's parts,
         "phm_adapter": {"n": 4}}  # n=12 needs a width the tiny models do not have


def config_of(name: str) -> dict:
    return {"method": name, **NEEDS.get(name, {})}


@pytest.fixture
def scratch(monkeypatch):
    """A copy of the registry for the test to register into; the real one is left as it was."""
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    return reg._REGISTRY


@dataclass
class ToyConfig(MethodConfig):
    method = "toy_method"
    description = "a method for the registry's tests"


class Toy(DeltaMethod):
    def install(self, installer) -> None:
        pass


def test_register_method_records_config_module_name_and_presets(scratch):
    @register_method(ToyConfig, presets={"toy_preset": Preset("a toy preset", gate_pooling="token")})
    class ToyModule(Toy):
        pass

    assert ToyModule.config_class is ToyConfig
    assert scratch["toy_method"] == Registered("toy_method", ToyConfig, ToyConfig.description, None, ToyModule)
    assert scratch["toy_preset"].preset == {"gate_pooling": "token"}
    assert scratch["toy_preset"].module_class is ToyModule
    assert parse_config("toy_preset").gate_pooling == "token"


def test_duplicate_name_raises_and_registers_nothing(scratch):
    @dataclass
    class OtherLoRA(MethodConfig):
        method = "lora"

    before = dict(scratch)
    with pytest.raises(RegistrationError, match=r"'lora' is registered twice.*unipelt\.methods\.lora\.LoRA.*rename"):
        register_method(OtherLoRA)(type("OtherLoRAModule", (Toy,), {}))
    # a preset under a taken name: the method's own entry is not added either
    with pytest.raises(RegistrationError, match="'houlsby' is registered twice"):
        register_method(ToyConfig, presets={"houlsby": Preset("clash")})(type("ToyModule", (Toy,), {}))
    # a preset named like its own method
    with pytest.raises(RegistrationError, match="'toy_method' is registered twice"):
        register_method(ToyConfig, presets={"toy_method": Preset("clash")})(type("ToyModule", (Toy,), {}))
    assert scratch == before
    # the very same registration again is no duplicate (the entry is equal)
    register_method(LoRA.config_class)(LoRA)
    assert scratch == before


def test_half_registered_methods_raise_with_the_fix(scratch):
    # a config without a module class: the decorator put on the config, or on nothing
    with pytest.raises(RegistrationError, match=r"'toy_method'.*has no module class.*@register_method\(ToyConfig\)"):
        register_method(ToyConfig)(ToyConfig)
    with pytest.raises(RegistrationError, match="has no module class"):
        register_method(ToyConfig)(None)
    # a module class without a config
    with pytest.raises(RegistrationError, match=r"has no config class.*@register_method\(XConfig\)"):
        register_method(None)(type("Lonely", (Toy,), {}))
    # a module whose own config_class disagrees
    with pytest.raises(RegistrationError, match="config_class is LoRAConfig, not ToyConfig"):
        register_method(ToyConfig)(type("Mixed", (Toy,), {"config_class": LoRA.config_class}))
    # a config with no name of its own
    with pytest.raises(RegistrationError, match="no `method` name of its own"):
        register_method(type("Nameless", (ToyConfig,), {}))(type("NamelessModule", (Toy,), {}))
    # a composition needs expand()
    with pytest.raises(RegistrationError, match="no expand"):
        register_composition(ToyConfig)
    assert "toy_method" not in scratch


def test_unregistered_classes_fail_the_import_check(scratch):
    reg.check_complete()  # every class under unipelt is registered
    with pytest.raises(RegistrationError, match=r"ToyConfig has no module class; put @register_method\(ToyConfig\)"):
        reg.check_complete([ToyConfig])
    with pytest.raises(RegistrationError, match="Toy has no config"):
        reg.check_complete([Toy])
    # and a package whose method forgot its module class does not import
    code = ("import dataclasses, unipelt.config as c, unipelt.registry as r\n"
            "Half = dataclasses.dataclass(type('HalfConfig', (c.MethodConfig,), {'method': 'half'}))\n"
            "Half.__module__ = 'unipelt.methods.half'\n"
            "r.check_complete()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "RegistrationError: method 'half': config unipelt.methods.half.HalfConfig has no module class" in out.stderr


def test_every_name_resolves_to_a_config_and_a_module():
    names = unipelt.methods()
    assert set(names) == set(reg.registry())
    for name in names:
        entry = reg.registry()[name]
        config = parse_config(config_of(name))
        assert isinstance(config, entry.config_class) and config.method == entry.config_class.method
        assert entry.description
        for plain in expand(config):
            module = reg.registry()[plain.method].module_class
            assert module is not None and issubclass(module, DeltaMethod) and module.config_class is type(plain)
    # the plain methods' table (serialization reads it) is the registry's
    assert {n: e.module_class for n, e in reg.registry().items() if e.preset is None and e.module_class} \
        == METHOD_CLASSES


def test_presets_resolve():
    assert parse_config("houlsby").to_dict() == parse_config({"method": "adapter", "placement": "houlsby",
                                                              "activation": "swish"}).to_dict()
    assert parse_config("pfeiffer").placement == "pfeiffer"
    assert parse_config("poly_s").heads == 4
    assert parse_config("vpt_deep").deep is True
    assert parse_config("mam_glue").adapter.bottleneck == 16 and parse_config("mam_glue").prefix.length == 16
    assert parse_config("unipelt_legacy").gate_pooling == "token"
    assert parse_config({"method": "houlsby", "bottleneck": 8}).bottleneck == 8


@pytest.mark.parametrize("name", sorted(reg.registry()))
def test_every_name_attaches(name):
    family = "vit" if name.startswith("vpt") else "bert"
    model = build(family)
    batch = inputs(family)
    unipelt.attach(model, name if name not in NEEDS else config_of(name))  # a name alone, where it can
    counts = unipelt.trainable_parameters(model)
    assert counts["total"] > counts["head"]
    assert torch.isfinite(logits(model, batch)).all()


def test_core_tells_a_composition_from_an_unknown_method():
    from unipelt.config import ConfigError
    from unipelt.core import _start, add_method

    model = build("bert")
    _start(model, train_head=True)
    with pytest.raises(ConfigError, match="'mam' is a composition.*expand it first"):
        add_method(model, parse_config("mam"))
    with pytest.raises(ConfigError, match="unknown method 'toy_method'"):
        add_method(model, ToyConfig())


def test_config_layer_does_not_import_the_methods():
    # config.py's own imports: the registry only, never the methods or the compositions
    tree = ast.parse((SRC / "config.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            imported.update("." * node.level + a.name for a in node.names if node.module is None)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not {m for m in imported if "methods" in m or "compositions" in m}, imported
    assert ".registry" in imported
    # registry.py imports nothing of unipelt at import time
    tree = ast.parse((SRC / "registry.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.level == 0 for n in top), [ast.dump(n) for n in top]
    # behaviour: config.py and registry.py load on their own, without unipelt/__init__.py pulling in the rest
    code = (
        "import importlib.util, sys, types\n"
        f"pkg = types.ModuleType('unipelt'); pkg.__path__ = [{str(SRC)!r}]; sys.modules['unipelt'] = pkg\n"
        "import unipelt.config as c\n"
        "print(sorted(m for m in sys.modules if m.startswith('unipelt')), c.registry())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['unipelt', 'unipelt.config', 'unipelt.registry'] {}"


def test_importing_the_package_fills_the_registry():
    out = subprocess.run([sys.executable, "-c", "import unipelt.config as c; print(len(c.registry()))"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(unipelt.methods())
