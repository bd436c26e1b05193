"""One module per method. Importing this package registers every method's config and class."""

from .adapter import Adapter, AdapterConfig
from .adapter_bias import AdapterBias, AdapterBiasConfig
from .base import DeltaMethod
from .bitfit import BitFit, BitFitConfig
from .compacter import Compacter, CompacterConfig
from .ia3 import IA3, IA3Config
from .krona import KronA, KronAConfig
from .ln_tuning import LNConfig, LNTuning
from .lora import LoRA, LoRAConfig
from .prefix import Prefix, PrefixConfig
from .prompt import Prompt, PromptConfig

METHOD_CLASSES: dict[str, type[DeltaMethod]] = {
    cls.config_class.method: cls
    for cls in (Adapter, AdapterBias, BitFit, Compacter, IA3, KronA, LNTuning, LoRA, Prefix, Prompt)
}

__all__ = [
    "METHOD_CLASSES", "Adapter", "AdapterBias", "AdapterBiasConfig", "AdapterConfig", "BitFit", "BitFitConfig",
    "Compacter", "CompacterConfig", "DeltaMethod", "IA3", "IA3Config", "KronA", "KronAConfig", "LNConfig",
    "LNTuning", "LoRA", "LoRAConfig", "Prefix", "PrefixConfig", "Prompt", "PromptConfig",
]
