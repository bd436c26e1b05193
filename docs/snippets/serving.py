# Serve two task deltas in one batch, and exchange a LoRA with peft's format.
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import unipelt
from unipelt.models import default_model_path

path = default_model_path()
tok = AutoTokenizer.from_pretrained(path)
batch = tok(["a gripping, funny film", "dull and far too long", "fine"], padding=True, return_tensors="pt")


def base_model():
    torch.manual_seed(0)  # the same head weights in every copy: served tasks share one head
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


# Two task deltas that leave the head alone (train_head=False), saved as usual.
for folder, method in [("out/task-a", "lora"), ("out/task-b", "ia3")]:
    model = unipelt.attach(base_model(), method, train_head=False)
    with torch.no_grad():  # stand-in for training: move the delta away from its init
        for p in unipelt.core.deltas(model).parameters():
            p.add_(0.05 * torch.randn_like(p))
    unipelt.save(model, folder)

served = base_model()
print(unipelt.load_tasks(served, {"a": "out/task-a", "b": "out/task-b"}))  # ['a', 'b']: task ids 0 and 1
with torch.no_grad():
    mixed = served(**batch, task_ids=torch.tensor([0, 1, 1])).logits  # one task id per row
    alone_b = unipelt.load(base_model(), "out/task-b")(**batch).logits
assert torch.allclose(mixed[1:], alone_b[1:], atol=1e-5)  # each row gets what its task's delta gives alone

# peft interop: an ungated unipelt LoRA writes adapter_config.json + adapter_model.safetensors ...
lora = unipelt.load(base_model(), "out/task-a")
unipelt.export_peft(lora, "out/task-a-peft")
# ... and unipelt.load reads such a folder (written by peft or by export_peft) as a unipelt LoRA.
again = unipelt.load(base_model(), "out/task-a-peft")
with torch.no_grad():
    assert torch.allclose(again(**batch).logits, lora(**batch).logits, atol=1e-6)
print("served and exchanged")
