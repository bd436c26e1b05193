"""Image classification: a folder of images per class, and scikit-learn's digits as the offline smoke task.

``images`` reads ``<data_dir>/<split>/<class name>/*.png|jpg|jpeg|bmp|gif`` (``dev`` may also be
called ``val`` or ``validation``); the classes are the train split's folder names, sorted. ``digits``
is the 8 x 8 handwritten digits set that scikit-learn ships (1,797 images, 10 classes; no download):
every fifth image is ``dev`` (also served as ``test``), the rest ``train``. Images are resized to the
model's input size (bilinear: an 8 x 8 digit is upscaled), converted to its channel count and
normalised with its preprocessor's mean and std (``preprocessor_config.json``; 0.5 where absent).
The metric is accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Features, Task, TaskDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass
class ImageExample:
    image: Any  # a PIL image or a path to one
    label: int


class ImagePreprocessor:
    """Resize, channel conversion and normalisation for one model (what its image processor would do)."""

    pad_token_id = 0  # the trainer's collate asks; images need no padding

    def __init__(self, size: int, channels: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.channels = size, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def for_model(cls, model: str | None) -> ImagePreprocessor:
        if model is None:
            raise TaskDataError("image tasks need a vision transformer: pass --model (a local ViT folder, or a Hub "
                                "name such as google/vit-base-patch16-224-in21k); the default model is a text model")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        if not hasattr(config, "image_size"):
            raise TaskDataError(f"{model} is a {config.model_type} model, not a vision transformer; image tasks "
                                f"need one (ViT)")
        channels = getattr(config, "num_channels", 3)
        mean, std = [0.5] * channels, [0.5] * channels
        processor_file = Path(model) / "preprocessor_config.json"
        if processor_file.exists():
            saved = json.loads(processor_file.read_text())
            mean, std = saved.get("image_mean", mean), saved.get("image_std", std)
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return cls(size, channels, mean, std)

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.open(image)
        image = image.convert("L" if self.channels == 1 else "RGB").resize((self.size, self.size),
                                                                           Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        return (pixels - self.mean) / self.std

    def save_pretrained(self, folder: str | Path) -> None:
        """Beside a fully fine-tuned model, so that evaluation preprocesses the same way."""
        channels = self.channels
        Path(folder, "preprocessor_config.json").write_text(json.dumps({
            "image_mean": self.mean.view(channels).tolist(), "image_std": self.std.view(channels).tolist(),
            "size": {"height": self.size, "width": self.size}}, indent=2) + "\n")


class ImageTask(Task):
    kind = "classification"
    main_metric = "accuracy"
    uses_images = True

    def __init__(self, name: str):
        self.name = name
        self.labels: list[str] | None = None

    def preprocessor(self, model: str | None) -> ImagePreprocessor:
        return ImagePreprocessor.for_model(model)

    def auto_model_class(self):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def model_kwargs(self, train_examples: Sequence[ImageExample]) -> dict[str, Any]:
        labels = self.labels or [str(i) for i in range(max(ex.label for ex in train_examples) + 1)]
        # a pretrained classifier of another label set is replaced by a fresh head of this one
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}, "ignore_mismatched_sizes": True}

    def featurize(self, examples: Sequence[ImageExample], tokenizer: Any, max_length: int) -> Features:
        if not isinstance(tokenizer, ImagePreprocessor):
            raise TaskDataError(f"{self.name} needs an image preprocessor, not a tokenizer")
        rows = [{"pixel_values": tokenizer(ex.image), "labels": torch.tensor(ex.label)} for ex in examples]
        return Features(rows)

    def score(self, model, features: Features, examples: Sequence[ImageExample], predict) -> dict[str, float]:
        pred = predict([{"pixel_values": r["pixel_values"]} for r in features.rows])["logits"].argmax(-1)
        gold = torch.tensor([ex.label for ex in examples])
        return {"accuracy": float((pred == gold).float().mean())}


class ImageFolderTask(ImageTask):
    def __init__(self):
        super().__init__("images")

    def load(self, split: str, data_dir: str | None) -> list[ImageExample]:
        if data_dir is None:
            raise TaskDataError("task 'images' reads --data-dir/<split>/<class>/*.png (or .jpg, ...); pass --data-dir")
        root = Path(data_dir)
        names = {"train": ("train",), "dev": ("dev", "val", "validation"), "test": ("test",)}.get(split)
        if names is None:
            raise TaskDataError(f"unknown split {split!r}; use train, dev or test")
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is None:
            raise TaskDataError(f"{root} has no {' or '.join(names)} folder of class folders")
        if self.labels is None:
            train = root / "train"
            self.labels = sorted(p.name for p in (train if train.is_dir() else folder).iterdir() if p.is_dir())
        examples = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name not in self.labels:
                raise TaskDataError(f"{class_dir} is a class the train split does not have ({self.labels})")
            label = self.labels.index(class_dir.name)
            examples += [ImageExample(path, label) for path in sorted(class_dir.iterdir())
                         if path.suffix.lower() in IMAGE_SUFFIXES]
        if not examples:
            raise TaskDataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
        return examples


class DigitsTask(ImageTask):
    def __init__(self):
        super().__init__("digits")
        self.labels = [str(i) for i in range(10)]

    def load(self, split: str, data_dir: str | None) -> list[ImageExample]:
        if split not in ("train", "dev", "test"):
            raise TaskDataError(f"unknown split {split!r}; use train, dev or test")
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = (lambda i: i % 5 != 0) if split == "train" else (lambda i: i % 5 == 0)
        grey = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 8-bit grey
        return [ImageExample(Image.fromarray(grey[i]), int(digits.target[i]))
                for i in range(len(digits.target)) if keep(i)]
