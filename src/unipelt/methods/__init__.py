"""One module per method. Importing this package registers every method (its ``@register_method`` line), then
checks that no config or module class was left unregistered."""

from .. import registry as _registry
from .adapter import Adapter, AdapterConfig
from .adapter_bias import AdapterBias, AdapterBiasConfig
from .attempt import Attempt, AttemptConfig
from .base import DeltaMethod
from .bitfit import BitFit, BitFitConfig
from .compacter import Compacter, CompacterConfig
from .ia3 import IA3, IA3Config
from .kadaptation import KAdaptation, KAdaptationConfig
from .krona import KronA, KronAConfig, KronAFFN, KronAFFNConfig
from .ln_tuning import LNConfig, LNTuning
from .lora import LoRA, LoRAConfig
from .poly import Poly, PolyConfig
from .prefix import Prefix, PrefixConfig
from .prompt import Prompt, PromptConfig
from .rational import Rational, RationalConfig
from .sparse_adapter import SparseAdapter, SparseAdapterConfig
from .vpt import VPT, VPTConfig

_registry.check_complete()  # a config without a module class (or the reverse) fails here, at import

# each plain method's module class by name (presets and compositions left out), read from the registry
METHOD_CLASSES: dict[str, type[DeltaMethod]] = {
    name: entry.module_class for name, entry in _registry.registry().items()
    if entry.module_class is not None and entry.preset is None
}

__all__ = [
    "METHOD_CLASSES", "Adapter", "AdapterBias", "AdapterBiasConfig", "AdapterConfig", "Attempt", "AttemptConfig",
    "BitFit", "BitFitConfig",
    "Compacter", "CompacterConfig", "DeltaMethod", "IA3", "IA3Config", "KAdaptation", "KAdaptationConfig", "KronA",
    "KronAConfig", "KronAFFN", "KronAFFNConfig", "LNConfig", "LNTuning", "LoRA", "LoRAConfig", "Poly", "PolyConfig",
    "Prefix", "PrefixConfig", "Prompt", "PromptConfig", "Rational", "RationalConfig", "SparseAdapter",
    "SparseAdapterConfig", "VPT", "VPTConfig",
]
