"""unipelt: parameter-efficient fine-tuning of transformers, one library for the catalogue of methods.

>>> model = unipelt.attach(model, "lora")          # or a config object, or {"method": "lora", "r": 4}
>>> unipelt.summary(model)
>>> unipelt.save(model, "out/task"); unipelt.load(fresh_model, "out/task")
>>> unipelt.merge(model)
"""

__version__ = "0.1.0"

from .combine import combine  # noqa: E402
from .compositions import Composition, MAMConfig, UniPELTConfig  # noqa: E402
from .config import ConfigError, MethodConfig, parse_config  # noqa: E402
from .core import attach, detach, merge, methods, summary, trainable_parameters  # noqa: E402
from .families import AttentionSpec as Attention  # noqa: E402
from .families import FamilySpec as Family  # noqa: E402
from .families import StackSpec as Stack  # noqa: E402
from .families import UnsupportedModelError, register_family  # noqa: E402
from .hub import push as push_to_hub  # noqa: E402
from .methods import (  # noqa: E402
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LNConfig,
    LoRAConfig,
    PrefixConfig,
    PromptConfig,
)
from .peft_format import export_peft, load_peft  # noqa: E402
from .planner import Plan, Site, plan  # noqa: E402
from .serialization import DeltaFileError, load, load_tasks, save  # noqa: E402
from .switching import active, disabled, set_active  # noqa: E402

__all__ = [
    "AdapterConfig", "BitFitConfig", "Composition", "ConfigError", "DeltaFileError", "IA3Config", "LNConfig",
    "LoRAConfig", "MAMConfig", "MethodConfig", "PrefixConfig", "PromptConfig", "UniPELTConfig",
    "UnsupportedModelError", "__version__", "attach", "detach", "export_peft", "load", "load_peft", "load_tasks",
    "merge", "methods", "parse_config", "save", "summary", "trainable_parameters",
    "active", "combine", "disabled", "set_active",
    "Attention", "Family", "Plan", "Site", "Stack", "plan", "push_to_hub", "register_family",
]

# the Hugging Face Trainer integration (unipelt.trainer) imports transformers.Trainer, seconds on a cold start:
# loaded on first use of its names
__all__ += ["DeltaTrainer"]


def __getattr__(name: str):
    if name == "DeltaTrainer":
        from .trainer import DeltaTrainer

        return DeltaTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
