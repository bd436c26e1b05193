# UniPELT, its ablations, MAM and a free composition.
from transformers import AutoModelForSequenceClassification

import unipelt
from unipelt.models import default_model_path


def fresh():
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)


# UniPELT as its authors' code builds it, plus the seed's prompt layer (10 tokens, joined after the embeddings)
model = unipelt.attach(fresh(), unipelt.UniPELTConfig(prompt=True))
print(sorted(unipelt.trainable_parameters(model)))  # ['adapter', 'head', 'lora', 'prefix', 'prompt', 'total']

# Ablate a part with None; override a part's options with a dict
model = unipelt.attach(fresh(), {"method": "unipelt", "prefix": None, "lora": {"r": 4}})

# MAM: prefix (l=30, MLP 800) + scaled parallel FFN adapter (m=512, s=4); mam_glue: l=16, m=16, s=2
model = unipelt.attach(fresh(), "mam_glue")

# Any list of methods, each gateable method with its own UniPELT gate
model = unipelt.attach(fresh(), unipelt.Composition(methods=[
    unipelt.LoRAConfig(gate=True),
    unipelt.IA3Config(),
    unipelt.AdapterConfig(placement="houlsby", gate=True),
]))
print(unipelt.summary(model))
