"""Frozen image-backbone features, computed once per image and read back memory-mapped in later epochs.

With the BLIP-2 tower frozen (the default) its output for an image never changes, so recomputing ViT-g every epoch
is pure waste. The cache file name carries fingerprints of the tower's weights and config and of the image files
(path, size, modification time): features from another backbone, or of other files under the same image ids, are
never reused by mistake.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import first_row_of_each_image
from ..processing_c2f import C2FProcessor


def backbone_fingerprint(vision_model: torch.nn.Module) -> str:
    # The config minus where it was loaded from: the same tower read from another path is the same tower.
    config = {key: value for key, value in vision_model.config.to_dict().items() if key != "_name_or_path"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def images_fingerprint(dataset: Dataset, first_row: dict[int, int]) -> str:
    """Which file each image id stands for: path, size and modification time (the bytes, for in-memory images). A
    cache keyed by image id alone handed 31 of 31 ids another image's features once a dataset lost one image."""
    digest = hashlib.sha256()
    for image_id, row in sorted(first_row.items()):
        image = dataset[row]["image"]
        digest.update(f"{image_id}:".encode())
        if isinstance(image, dict):
            image = image.get("path") if image.get("bytes") is None else image["bytes"]
        if isinstance(image, (str, os.PathLike)):
            stat = os.stat(image)
            digest.update(f"{os.path.abspath(image)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        elif isinstance(image, bytes):
            digest.update(hashlib.sha256(image).digest())
        else:  # a decoded image (PIL)
            digest.update(hashlib.sha256(image.tobytes()).digest())
    return digest.hexdigest()[:16]


class ImageFeatureCache:
    """`cache[image_id]` -> the vision tower's last hidden state `[1 + patches, hidden]` for that image."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        self._keys = set(self._file.keys())

    def __contains__(self, image_id: int) -> bool:
        return str(int(image_id)) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, image_id: int) -> torch.Tensor:
        key = str(int(image_id))
        if key not in self._keys:
            raise KeyError(f"image id {image_id} is not in the feature cache {self.path}; rebuild it for this dataset")
        return self._file.get_tensor(key)

    @classmethod
    @torch.no_grad()
    def build(cls, vision_model, processor: C2FProcessor, dataset: Dataset, cache_dir: str | os.PathLike,
              tag: str = "train", batch_size: int = 32) -> "ImageFeatureCache":
        """Compute (or reuse) the features of every distinct image of `dataset`."""
        first_row = first_row_of_each_image(dataset)
        # The tower's weights and the image files both name the file: a change to either builds a new cache.
        path = (Path(cache_dir) /
                f"image_features-{tag}-{backbone_fingerprint(vision_model)}-{images_fingerprint(dataset, first_row)}.safetensors")
        if path.is_file():
            cache = cls(path)
            if all(image_id in cache for image_id in first_row):
                return cache
        device = next(vision_model.parameters()).device
        was_training = vision_model.training
        vision_model.eval()
        images = dataset.select(list(first_row.values()))
        loader = DataLoader(images, batch_size=batch_size,
                            collate_fn=lambda rows: (processor(images=[r["image"] for r in rows])["pixel_values"], [r["image_id"] for r in rows]))
        features = {}
        for pixel_values, image_ids in tqdm(loader, desc="caching frozen image features"):
            hidden = vision_model(pixel_values=pixel_values.to(device)).last_hidden_state.cpu()
            features.update({str(int(i)): h.clone() for i, h in zip(image_ids, hidden)})
        vision_model.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(features, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        return cls(path)
