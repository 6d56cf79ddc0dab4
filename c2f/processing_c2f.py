"""Processor for c2f: waveforms and images in, `input_values` / `attention_mask` / `pixel_values` out.

This file is copied verbatim to a Hub repository by `save_pretrained`: it imports only numpy, PIL, torch and
transformers at module level; soundfile and soxr are imported when a file must be decoded or audio resampled.
"""

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

AudioLike = str | os.PathLike | np.ndarray | torch.Tensor | dict
ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def _describe(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"item {index} ({os.fspath(item)})"
    if isinstance(item, dict) and item.get("path"):
        return f"item {index} ({item['path']})"
    return f"item {index}"


def _optional(module: str, pip_name: str):
    """Import what only some inputs need, or say how to install it (this file also runs from a Hub folder, where
    c2f's own requirements may not be installed)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"c2f needs {pip_name} for this input: pip install {pip_name} (or pip install c2f)") from error


def _read_audio_file(source: Any, label: str) -> tuple[np.ndarray, int]:
    soundfile = _optional("soundfile", "soundfile")

    try:
        waveform, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types; the caller needs the file name either way
        raise ValueError(f"audio {label} could not be read as an audio file: {error}") from error
    return waveform.mean(axis=1), rate  # [samples, channels] -> mono


def _to_mono(waveform: np.ndarray, label: str) -> np.ndarray:
    if waveform.ndim == 1:
        return waveform
    if waveform.ndim == 2:
        # Channels are the short axis: [channels, samples] (torch style) or [samples, channels] (soundfile style).
        channel_axis = 0 if waveform.shape[0] < waveform.shape[1] else 1
        return waveform.mean(axis=channel_axis)
    raise ValueError(f"audio {label} has shape {waveform.shape}; expected [samples] or [channels, samples]")


def resample_audio(waveform: np.ndarray, orig_rate: float, target_rate: float, quality: str = "HQ") -> np.ndarray:
    """Resample with soxr (its high-quality filter unless `quality` says otherwise); a no-op at the target rate."""
    if orig_rate == target_rate:
        return waveform
    soxr = _optional("soxr", "soxr")
    return soxr.resample(waveform, orig_rate, target_rate, quality=quality).astype(np.float32)


def load_audio(item: AudioLike, target_rate: int, sampling_rate: int | None = None, index: int = 0) -> np.ndarray:
    """Any supported audio input -> mono float32 waveform at `target_rate`, or a `ValueError` naming the item.

    Accepts a file path, a numpy array or torch tensor (`[samples]`, or 2-D with channels on the short axis; at
    `sampling_rate`, else assumed to be at `target_rate`), or a `datasets`-style dict with `array` + `sampling_rate`,
    `path` or `bytes`.
    """
    label = _describe(item, index)
    if sampling_rate is not None and not sampling_rate > 0:
        raise ValueError(f"audio {label}: sampling_rate must be a positive number of Hz, got {sampling_rate!r}")
    rate = sampling_rate if sampling_rate is not None else target_rate
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise ValueError(f"audio {label} does not exist; expected a path to an audio file")
        waveform, rate = _read_audio_file(item, label)
    elif isinstance(item, dict):
        if item.get("array") is not None:
            waveform = np.asarray(item["array"], dtype=np.float32)
            if "sampling_rate" in item and not (item["sampling_rate"] or 0) > 0:
                raise ValueError(f"audio {label}: 'sampling_rate' must be a positive number of Hz, got {item['sampling_rate']!r}")
            rate = int(item.get("sampling_rate") or rate)
            waveform = _to_mono(waveform, label)
        elif item.get("bytes") is not None:
            waveform, rate = _read_audio_file(io.BytesIO(item["bytes"]), label)
        elif item.get("path") is not None:
            return load_audio(item["path"], target_rate, index=index)
        else:
            raise ValueError(f"audio {label} is a dict without 'array', 'bytes' or 'path'")
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        array = item.detach().cpu().float().numpy() if isinstance(item, torch.Tensor) else item
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"audio {label} has dtype {array.dtype}; expected a numeric waveform")
        waveform = _to_mono(array.astype(np.float32, copy=False), label)
    else:
        raise ValueError(
            f"audio {label} is a {type(item).__name__}; expected a file path, numpy array, torch tensor or a dict "
            "with 'array' and 'sampling_rate'"
        )
    if waveform.size == 0:
        raise ValueError(f"audio {label} is empty; expected at least one sample")
    if not np.isfinite(waveform).all():
        raise ValueError(f"audio {label} contains NaN or infinite samples; expected finite values")
    return resample_audio(waveform, rate, target_rate)


def load_image(item: ImageLike, index: int = 0) -> Image.Image | np.ndarray | torch.Tensor:
    """A file path or PIL image -> RGB PIL image (arrays pass through), or a `ValueError` naming the item."""
    label = _describe(item, index)
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise ValueError(f"image {label} does not exist; expected a path to an image file")
        try:
            with Image.open(item) as opened:
                return opened.convert("RGB")
        except Exception as error:  # PIL raises several types for truncated or foreign files
            raise ValueError(f"image {label} could not be read as an image: {error}") from error
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (np.ndarray, torch.Tensor)):
        if item.ndim != 3 or not ({item.shape[0], item.shape[-1]} & {1, 3}):
            raise ValueError(f"image {label} has shape {tuple(item.shape)}; expected [H, W, 3] or [3, H, W]")
        if item.dtype.is_floating_point if isinstance(item, torch.Tensor) else np.issubdtype(item.dtype, np.floating):
            # The image processor divides by 255; a float image in [0, 1] would come out nearly black.
            if float(item.max()) <= 1.0 and float(item.min()) >= 0.0:
                return item * 255.0
        return item
    raise ValueError(f"image {label} is a {type(item).__name__}; expected a file path, PIL image or array")


def _as_list(inputs: Any, single_types: tuple) -> list:
    if isinstance(inputs, single_types):
        return [inputs]
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 1:
        return [inputs]
    return list(inputs)


class C2FProcessor(ProcessorMixin):
    r"""
    Bundles a [`Wav2Vec2FeatureExtractor`] (16 kHz, the HuBERT front end) and a BLIP image processor (the PIL variant,
    so no torchvision is needed).

    `processor(audio=..., images=..., sampling_rate=...)` accepts a single item or a list of file paths, numpy
    arrays, torch tensors or `{"array", "sampling_rate"}` dicts for audio, and file paths, PIL images or arrays for
    images. Audio is downmixed to mono and resampled to the feature extractor's rate, then padded with an attention
    mask. Bad items raise a `ValueError` that names the item and what was expected.
    """

    def __init__(self, feature_extractor, image_processor):
        super().__init__(feature_extractor, image_processor)

    @classmethod
    def from_backbones(cls, speech_model_name_or_path: str, image_model_name_or_path: str) -> "C2FProcessor":
        """The HuBERT checkpoint's feature extractor and the BLIP-2 checkpoint's image settings (PIL backend)."""
        from transformers import Wav2Vec2FeatureExtractor
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(speech_model_name_or_path)
        image_processor = BlipImageProcessorPil.from_pretrained(image_model_name_or_path)
        return cls(feature_extractor, image_processor)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    def prepare_audio(self, audio: AudioLike | Sequence[AudioLike], sampling_rate: int | None = None) -> list:
        if isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim != 1:
            # [2, N] could be one stereo clip or two mono clips, [N, 2] one stereo clip: guessing was wrong either way.
            raise ValueError(
                f"audio is one array of shape {tuple(audio.shape)}: ambiguous between one multi-channel clip and a "
                "batch; pass one clip as a 1-D array, or a list of clips (each [samples] or [channels, samples])"
            )
        items = _as_list(audio, (str, os.PathLike, dict))
        return [load_audio(item, self.sampling_rate, sampling_rate, index) for index, item in enumerate(items)]

    def prepare_images(self, images: ImageLike | Sequence[ImageLike]) -> list:
        items = _as_list(images, (str, os.PathLike, Image.Image))
        if len(items) and isinstance(items[0], (int, float)):
            raise ValueError("images must be images or a list of images, not a list of numbers")
        return [load_image(item, index) for index, item in enumerate(items)]

    def __call__(
        self,
        audio: AudioLike | Sequence[AudioLike] | None = None,
        images: ImageLike | Sequence[ImageLike] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Returns `input_values` + `attention_mask` for audio and `pixel_values` for images.

        `max_length` (in samples at 16 kHz) truncates long audio.
        """
        if audio is None and images is None:
            raise ValueError("C2FProcessor needs audio=..., images=... or both")
        data = {}
        if audio is not None:
            waveforms = self.prepare_audio(audio, sampling_rate)
            if not waveforms:
                raise ValueError("C2FProcessor got an empty list of audio")
            features = self.feature_extractor(
                waveforms,
                sampling_rate=self.sampling_rate,
                padding="longest",
                max_length=max_length,
                truncation=max_length is not None,
                return_attention_mask=True,
                return_tensors=return_tensors,
            )
            data.update(features)
        if images is not None:
            prepared = self.prepare_images(images)
            if not prepared:
                raise ValueError("C2FProcessor got an empty list of images")
            data.update(self.image_processor(prepared, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_values", "attention_mask", "pixel_values"]


__all__ = ["C2FProcessor", "load_audio", "load_image", "resample_audio"]
