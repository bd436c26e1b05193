"""One module per method. Importing this package registers every method's config and class."""

from .adapter import Adapter, AdapterConfig
from .base import DeltaMethod
from .bitfit import BitFit, BitFitConfig
from .ia3 import IA3, IA3Config
from .ln_tuning import LNConfig, LNTuning
from .lora import LoRA, LoRAConfig
from .prefix import Prefix, PrefixConfig
from .prompt import Prompt, PromptConfig

METHOD_CLASSES: dict[str, type[DeltaMethod]] = {
    cls.config_class.method: cls for cls in (Adapter, BitFit, IA3, LNTuning, LoRA, Prefix, Prompt)
}

__all__ = [
    "METHOD_CLASSES", "Adapter", "AdapterConfig", "BitFit", "BitFitConfig", "DeltaMethod", "IA3", "IA3Config",
    "LNConfig", "LNTuning", "LoRA", "LoRAConfig", "Prefix", "PrefixConfig", "Prompt", "PromptConfig",
]
