"""Frozen-backbone features, computed once per image (or clip) and read back memory-mapped in later epochs.

With the BLIP-2 tower frozen (the default) its output for an image never changes, so recomputing ViT-g every epoch
is pure waste; the same holds for a frozen HuBERT (as SpeechCLIP trains) when the clips are not augmented. The cache
file name carries fingerprints of the backbone's weights and config and of the media files (path, size,
modification time): features from another backbone, or of other files under the same keys, are never reused by
mistake.
"""

import hashlib
import os
from pathlib import Path

import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import first_row_of_each_image, media_cache_key
from ..fingerprint import weights_fingerprint
from ..processing_c2f import C2FProcessor


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    # The config minus where it was loaded from: the same tower read from another path is the same tower.
    config = {key: value for key, value in backbone.config.to_dict().items() if key != "_name_or_path"}
    return weights_fingerprint(sorted(backbone.state_dict().items()), config)


def _digest_file(digest, item) -> None:
    """Feed one file reference (a path, or `{"path"/"bytes"}`, or a decoded PIL image) into `digest`."""
    if isinstance(item, dict):
        item = item.get("path") if item.get("bytes") is None else item["bytes"]
    if isinstance(item, (str, os.PathLike)):
        stat = os.stat(item)
        digest.update(f"{os.path.abspath(item)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    elif isinstance(item, bytes):
        digest.update(hashlib.sha256(item).digest())
    else:  # a decoded image (PIL)
        digest.update(hashlib.sha256(item.tobytes()).digest())


def images_fingerprint(dataset: Dataset, first_row: dict[int, int]) -> str:
    """Which file each image id stands for: path, size and modification time (the bytes, for in-memory images). A
    cache keyed by image id alone handed 31 of 31 ids another image's features once a dataset lost one image."""
    digest = hashlib.sha256()
    for image_id, row in sorted(first_row.items()):
        digest.update(f"{image_id}:".encode())
        _digest_file(digest, dataset[row]["image"])
    return digest.hexdigest()[:16]


def audio_key(audio) -> str:
    """The speech cache's key of one clip: its file path (the cache's file name fingerprints size and time)."""
    path = media_cache_key(audio, prefix="")
    if path is None:
        raise ValueError("the HuBERT feature cache keys clips by file path; this dataset holds in-memory audio (use "
                         "--speech_feature_cache false, or a dataset with audio paths)")
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()


class _FeatureCache:
    """`cache[item]` -> one backbone output, read from a safetensors file on demand. Subclasses say how an item (an
    image id, a clip) becomes a key."""

    what = "item"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        self._keys = set(self._file.keys())

    @staticmethod
    def key(item) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, item) -> bool:
        return self.key(item) in self._keys

    def __getitem__(self, item) -> torch.Tensor:
        key = self.key(item)
        if key not in self._keys:
            raise KeyError(f"{self.what} {item} is not in the feature cache {self.path}; rebuild it for this dataset")
        return self._file.get_tensor(key)

    @staticmethod
    def _write(features: dict[str, torch.Tensor], path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(features, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)  # atomic: a crash leaves no half-written cache behind

    @classmethod
    def _find(cls, cache_dir, kind: str, tag: str, backbone: torch.nn.Module, files: str, items) -> tuple[Path, "_FeatureCache | None"]:
        """The cache file's path (named by the backbone's weights and the media files' fingerprint) and the cache
        there, if it holds every item; else None (to be built)."""
        path = Path(cache_dir) / f"{kind}_features-{tag}-{backbone_fingerprint(backbone)}-{files}.safetensors"
        if not path.is_file():
            return path, None
        cache = cls(path)
        return path, cache if all(item in cache for item in items) else None


class SpeechFeatureCache(_FeatureCache):
    """`cache[audio]` -> a frozen HuBERT's frames `[frames, hidden]` for that clip, computed on the clip alone (no
    padding), in eval mode. Valid only while the clips are not augmented: the collator refuses the two together."""

    what = "clip"
    key = staticmethod(audio_key)

    @classmethod
    @torch.no_grad()
    def build(cls, model, processor: C2FProcessor, dataset: Dataset, cache_dir: str | os.PathLike,
              tag: str = "train") -> "SpeechFeatureCache":
        """Compute (or reuse) the frames of every clip of `dataset` with `model`'s (frozen) speech backbone."""
        if model.speech_layer_weights is not None:
            raise ValueError("the HuBERT feature cache stores the last layer; speech_layer_pooling='weighted_sum' "
                             "learns a mix of all layers: use --speech_feature_cache false")
        audios = list(dataset["audio"])
        digest = hashlib.sha256()
        for audio in audios:
            _digest_file(digest, audio)
        path, cache = cls._find(cache_dir, "speech", tag, model.speech_model, digest.hexdigest()[:16], audios)
        if cache is not None:
            return cache
        device = next(model.parameters()).device
        was_training = model.speech_model.training
        model.speech_model.eval()
        features = {}
        for index, audio in enumerate(tqdm(audios, desc="caching frozen HuBERT features")):
            inputs = processor(audio=[audio])
            frames, _ = model.speech_frames(inputs["input_values"].to(device), None)
            features[audio_key(audio)] = frames[0].cpu().clone()
        model.speech_model.train(was_training)
        cls._write(features, path)
        return cls(path)


class ImageFeatureCache(_FeatureCache):
    """`cache[image_id]` -> the vision tower's last hidden state `[1 + patches, hidden]` for that image."""

    what = "image id"

    @staticmethod
    def key(image_id: int) -> str:
        return str(int(image_id))

    @classmethod
    @torch.no_grad()
    def build(cls, vision_model, processor: C2FProcessor, dataset: Dataset, cache_dir: str | os.PathLike,
              tag: str = "train", batch_size: int = 32) -> "ImageFeatureCache":
        """Compute (or reuse) the features of every distinct image of `dataset`."""
        first_row = first_row_of_each_image(dataset)
        # The tower's weights and the image files both name the file: a change to either builds a new cache.
        path, cache = cls._find(cache_dir, "image", tag, vision_model, images_fingerprint(dataset, first_row), first_row)
        if cache is not None:
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
        cls._write(features, path)
        return cls(path)
