"""Training-time augmentation: voices for the speech side (the demo's test speakers are voices the model never heard),
small shifts for the image side when its tower trains.

Measured in probes on the demo (bare loop, 2-minute screens): speed perturbation (+-15%) and white noise
(half the clips, 10-30 dB SNR) each added about 5 held-out-voice test points; SpecAugment-style masking did not help.
Each batch's draws come from a generator seeded by (seed, batch number), not from torch's global generator: the
data loader collates a batch ahead of training, and `Trainer` restores the global RNG only after a resumed run has
collated its first batch, so neither a sequential generator nor the global one would resume exactly. `C2FTrainer`
sets the batch number from the checkpoint's step when it resumes.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .modeling_c2f import shift_images
from .processing_c2f import resample_audio


class _SeededByBatch:
    """Every batch's draws come from `self.generator`, reseeded from (seed, batch number) at the start of the batch."""

    seed: int
    batch_number: int

    def _reset_draws(self) -> None:
        self.generator = torch.Generator()
        self.batch_number = 0

    def _start_batch(self) -> None:
        self.generator.manual_seed(int(np.random.SeedSequence([self.seed, self.batch_number]).generate_state(1)[0]))
        self.batch_number += 1


@dataclass
class SpeechAugmentation(_SeededByBatch):
    """Speed perturbation (tempo and pitch together, as in Kaldi's 3-way speed perturbation but continuous) and
    additive white noise, applied to one mono waveform at a time.

    Args:
        speed_range: the playback speed is drawn uniformly from this range; `(1.0, 1.0)` disables it.
        noise_probability: share of clips that get noise; 0 disables it.
        noise_snr_db: the signal-to-noise ratio of the added noise is drawn uniformly from this range (dB).
        seed: seeds the generator every draw comes from.
    """

    speed_range: tuple[float, float] = (0.85, 1.15)
    noise_probability: float = 0.5
    noise_snr_db: tuple[float, float] = (10.0, 30.0)
    seed: int = 0

    def __post_init__(self):
        low, high = self.speed_range
        if not 0 < low <= high:
            raise ValueError(f"SpeechAugmentation.speed_range must satisfy 0 < low <= high, got {self.speed_range}")
        if not 0 <= self.noise_probability <= 1:
            raise ValueError(f"SpeechAugmentation.noise_probability must be in [0, 1], got {self.noise_probability}")
        if self.noise_snr_db[0] > self.noise_snr_db[1]:
            raise ValueError(f"SpeechAugmentation.noise_snr_db must be (low, high), got {self.noise_snr_db}")
        self._reset_draws()

    def augment_batch(self, waveforms: list[np.ndarray], sampling_rate: int) -> list[np.ndarray]:
        """Augment one batch with the draws of batch number `self.batch_number`, then count it."""
        self._start_batch()
        return [self(waveform, sampling_rate) for waveform in waveforms]

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def __call__(self, waveform: np.ndarray, sampling_rate: int) -> np.ndarray:
        speed = self._uniform(*self.speed_range)
        if speed != 1.0:
            # Read as if recorded at speed x the rate, then brought back to the rate: 1/speed as long, pitch x speed.
            # soxr's quick (cubic) resampler: an augmentation needs no studio-grade anti-aliasing, and the filtered
            # qualities took a third of the demo's collate time (HQ 1.1 ms a clip, LQ 1.0, QQ 0.5).
            waveform = resample_audio(waveform, sampling_rate * speed, sampling_rate, quality="QQ")
        if self.noise_probability > 0 and self._uniform(0.0, 1.0) < self.noise_probability:
            snr_db = self._uniform(*self.noise_snr_db)
            signal_rms = float(np.sqrt(np.mean(np.square(waveform), dtype=np.float64)))
            noise = torch.randn(waveform.shape[0], generator=self.generator).numpy() * (signal_rms / 10 ** (snr_db / 20))
            waveform = (waveform + noise).astype(np.float32)
        return waveform


@dataclass
class ImageAugmentation(_SeededByBatch):
    """Each training image moved by a whole number of pixels, up to `max_shift` of its side each way, the border
    pixels repeated into the gap. No flips and no colour changes: captions name left and right and colours.

    A tower trained from scratch on a few hundred images otherwise sees each one identically every epoch.
    """

    max_shift: float = 0.06
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.max_shift < 0.5:
            raise ValueError(f"ImageAugmentation.max_shift must be in [0, 0.5), got {self.max_shift}")
        self._reset_draws()

    def augment_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[batch, channels, height, width]` -> the same shape, shifted, with the draws of batch `self.batch_number`."""
        self._start_batch()
        height, width = pixel_values.shape[-2:]
        pad = round(self.max_shift * max(height, width))
        if pad == 0:
            return pixel_values
        # Each draw is a crop offset into the image padded by `pad`; the move is its mirror.
        moves = (pad - torch.randint(0, 2 * pad + 1, (len(pixel_values), 2), generator=self.generator)).tolist()
        return torch.cat([shift_images(pixel_values[i : i + 1], down, right) for i, (down, right) in enumerate(moves)])
