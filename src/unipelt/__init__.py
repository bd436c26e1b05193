"""unipelt: parameter-efficient fine-tuning of transformers, one library for the catalogue of methods.

>>> model = unipelt.attach(model, "lora")          # or a config object, or {"method": "lora", "r": 4}
>>> unipelt.summary(model)
>>> unipelt.save(model, "out/task"); unipelt.load(fresh_model, "out/task")
>>> unipelt.merge(model)
"""

__version__ = "0.1.0"

from .compositions import Composition, MAMConfig, UniPELTConfig  # noqa: E402
from .config import ConfigError, MethodConfig, parse_config  # noqa: E402
from .core import attach, detach, merge, methods, summary, trainable_parameters  # noqa: E402
from .families import UnsupportedModelError  # noqa: E402
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
from .serialization import DeltaFileError, load, load_tasks, save  # noqa: E402

__all__ = [
    "AdapterConfig", "BitFitConfig", "Composition", "ConfigError", "DeltaFileError", "IA3Config", "LNConfig",
    "LoRAConfig", "MAMConfig", "MethodConfig", "PrefixConfig", "PromptConfig", "UniPELTConfig",
    "UnsupportedModelError", "__version__", "attach", "detach", "export_peft", "load", "load_peft", "load_tasks",
    "merge", "methods", "parse_config", "save", "summary", "trainable_parameters",
]
