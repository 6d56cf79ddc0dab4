"""Voice augmentation of training clips: seeded, switchable, and doing what it says; decoded audio is cached."""

import numpy as np
import pytest
import torch

import c2f.data
from c2f.augmentation import SpeechAugmentation
from c2f.data import SpeechImageCollator, load_demo


def _tone(seconds=1.0, rate=16000):
    time = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * time)).astype(np.float32)


def test_draws_depend_on_seed_and_batch_number_only():
    clips = [_tone(), _tone(0.5)]
    first = SpeechAugmentation(seed=3).augment_batch(clips, 16000)
    torch.manual_seed(99)  # the global generator plays no part
    again = SpeechAugmentation(seed=3).augment_batch(clips, 16000)
    other = SpeechAugmentation(seed=4).augment_batch(clips, 16000)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(first, other))
    sequential = SpeechAugmentation(seed=3)
    batches = [sequential.augment_batch(clips, 16000) for _ in range(3)]
    jumped = SpeechAugmentation(seed=3)
    jumped.batch_number = 2  # as a resumed run sets it
    assert all(np.array_equal(a, b) for a, b in zip(jumped.augment_batch(clips, 16000), batches[2]))
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(batches[1], batches[2]))


def test_speed_perturbation_changes_duration_by_the_drawn_factor():
    augment = SpeechAugmentation(speed_range=(1.25, 1.25), noise_probability=0.0)
    out = augment(_tone(), 16000)
    assert abs(len(out) - 16000 / 1.25) <= 2
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 220 * 1.25) < 5  # pitch moves with tempo


def test_noise_lands_in_the_requested_snr_range():
    augment = SpeechAugmentation(speed_range=(1.0, 1.0), noise_probability=1.0, noise_snr_db=(20.0, 20.0))
    clean = _tone()
    noisy = augment(clean, 16000)
    snr = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
    assert abs(snr - 20.0) < 0.5


def test_disabled_parts_leave_the_clip_alone():
    augment = SpeechAugmentation(speed_range=(1.0, 1.0), noise_probability=0.0)
    assert np.array_equal(augment(_tone(), 16000), _tone())


@pytest.mark.parametrize("kwargs", [dict(speed_range=(0.0, 1.1)), dict(speed_range=(1.2, 1.1)),
                                    dict(noise_probability=1.5), dict(noise_snr_db=(30.0, 10.0))])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="SpeechAugmentation"):
        SpeechAugmentation(**kwargs)


def test_collator_decodes_each_clip_once_and_augments_every_time(processor, monkeypatch):
    records = [load_demo("validation")[row] for row in range(4)]
    decoded = []
    real_load_audio = c2f.data.load_audio
    monkeypatch.setattr(c2f.data, "load_audio", lambda *a, **k: decoded.append(a[0]) or real_load_audio(*a, **k))
    collator = SpeechImageCollator(processor, augmentation=SpeechAugmentation(), decoded_cache_bytes=2**26)
    first = collator(records)
    second = collator(records)
    assert len(decoded) == 4  # the second batch came from memory
    assert not torch.equal(first["input_values"], second["input_values"])  # but was augmented afresh
    plain = SpeechImageCollator(processor, decoded_cache_bytes=0)
    plain(records)
    plain(records)
    assert len(decoded) == 12  # no cache: decoded every time


def test_image_shift_moves_whole_images_by_seeded_offsets_within_the_limit():
    from c2f.augmentation import ImageAugmentation

    pixels = torch.zeros(6, 3, 20, 20)
    pixels[:, :, 8:12, 8:12] = 1.0  # a square in the middle, on a flat background
    shifted = ImageAugmentation(max_shift=0.1, seed=1).augment_batch(pixels)  # up to 2 px each way
    assert shifted.shape == pixels.shape
    moves = set()
    for image in shifted:
        rows, cols = torch.nonzero(image[0], as_tuple=True)
        assert len(rows) == 16  # the square, whole: only moved
        top, left = int(rows.min()) - 8, int(cols.min()) - 8
        assert -2 <= top <= 2 and -2 <= left <= 2
        moves.add((top, left))
    assert len(moves) > 1
    again = ImageAugmentation(max_shift=0.1, seed=1).augment_batch(pixels)
    assert torch.equal(again, shifted)
    assert not torch.equal(ImageAugmentation(max_shift=0.1, seed=2).augment_batch(pixels), shifted)
    assert torch.equal(ImageAugmentation(max_shift=0.0).augment_batch(pixels), pixels)
    with pytest.raises(ValueError, match="max_shift"):
        ImageAugmentation(max_shift=0.6)


def test_collator_shifts_training_images_only_when_asked(processor):
    from c2f.augmentation import ImageAugmentation

    records = [dict(row) for row in load_demo("validation").select(range(4))]
    plain = SpeechImageCollator(processor)(records)["pixel_values"]
    shifted = SpeechImageCollator(processor, image_augmentation=ImageAugmentation(max_shift=0.1, seed=0))(records)["pixel_values"]
    assert shifted.shape == plain.shape and not torch.equal(shifted, plain)
    with pytest.raises(ValueError, match="image feature cache"):
        SpeechImageCollator(processor, image_features=object(), image_augmentation=ImageAugmentation())
