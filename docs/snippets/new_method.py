# A new method in one file: a learned vector scales the output of every FFN (W_2), IA3-style.
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AutoModelForSequenceClassification

import unipelt
from unipelt.config import MethodConfig
from unipelt.methods.base import DeltaMethod, cast_like
from unipelt.models import default_model_path
from unipelt.registry import Preset, register_method
from unipelt.runtime import Installer
from unipelt.sites import ModelMap


@dataclass
class FFNScaleConfig(MethodConfig):
    method = "ffn_scale"  # the name attach, --method and the registry know it by
    description = "a learned vector scales every FFN output (init ones), mergeable"
    reference_lr = None  # None: the trainer's table, else 5e-4

    init: float = 1.0  # an option: --set init=0.5, {"method": "ffn_scale", "init": 0.5}


@register_method(FFNScaleConfig, presets={"ffn_half": Preset("ffn_scale starting at one half", init=0.5)})
class FFNScale(DeltaMethod):
    serves_rows = True  # its hook honours installer.rows, so load_tasks may serve it

    def __init__(self, config: FFNScaleConfig, model_map: ModelMap):
        super().__init__(config, model_map)  # holds only its own parameters
        self.sites = {layer.key: layer.ffn_out for layer in model_map.layers}
        self.scales = nn.ParameterDict({
            k: nn.Parameter(torch.full((proj.out_features,), config.init)) for k, proj in self.sites.items()})

    def install(self, installer: Installer) -> None:  # hooks only; detach removes them
        for k, proj in self.sites.items():
            installer.on_output(proj.module, self._hook(k, installer.rows))

    def _hook(self, k, rows):
        scale = self.scales[k]

        def scale_output(module, inputs, output):
            served = rows(output)  # None, or 0/1 per row when serving several tasks
            s = cast_like(scale, output)
            return output * (s if served is None else 1.0 + (s - 1.0) * served)

        return scale_output

    def mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge(self) -> None:  # exact: rows of W_2 and its bias are scaled
        for k, proj in self.sites.items():
            proj.scale_outputs(self.scales[k])


model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
model = unipelt.attach(model, "ffn_half")
print(unipelt.trainable_parameters(model))  # {'ffn_scale': 2304, 'head': 770, 'total': 3074}
assert "ffn_scale" in unipelt.methods() and "ffn_half" in unipelt.methods()
unipelt.merge(model)  # folds into W_2: a plain model again
