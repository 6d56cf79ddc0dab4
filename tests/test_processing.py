import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from c2f.processing_c2f import load_audio


def _sine(freq, rate, seconds=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_frequency(waveform, rate):
    spectrum = np.abs(np.fft.rfft(waveform))
    return np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()]


def test_resampling_keeps_pitch_and_duration():
    resampled = load_audio(_sine(440, 8000), 16000, sampling_rate=8000)
    assert len(resampled) == 8000
    assert abs(_dominant_frequency(resampled, 16000) - 440) < 5


def test_stereo_is_downmixed_in_either_layout(tmp_path):
    left, right = _sine(300, 16000), _sine(700, 16000)
    stereo = np.stack([left, right])
    expected = (left + right) / 2
    assert np.allclose(load_audio(stereo, 16000), expected, atol=1e-6)  # [channels, samples]
    assert np.allclose(load_audio(torch.from_numpy(stereo.T.copy()), 16000), expected, atol=1e-6)  # [samples, ch]
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo.T, 16000, subtype="FLOAT")
    assert np.allclose(load_audio(str(path), 16000), expected, atol=1e-6)


def test_processor_accepts_paths_arrays_tensors_and_dicts(tmp_path, processor):
    wav_path, flac_path, image_path = tmp_path / "a.wav", tmp_path / "b.flac", tmp_path / "c.png"
    soundfile.write(wav_path, _sine(200, 8000), 8000)  # another rate: resampled
    soundfile.write(flac_path, _sine(200, 16000, 0.25), 16000)
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(image_path)
    audio = [str(wav_path), flac_path, torch.from_numpy(_sine(200, 16000, 0.1)), {"array": _sine(200, 22050, 0.2), "sampling_rate": 22050}]
    images = [str(image_path), Image.new("RGB", (20, 20), "red"), np.zeros((64, 64, 3), dtype=np.uint8), Image.new("L", (9, 9))]
    out = processor(audio=audio, images=images)
    assert out["input_values"].shape == (4, 8000) and out["attention_mask"].shape == (4, 8000)
    assert out["attention_mask"].sum(dim=1).tolist() == [8000, 4000, 1600, 3200]
    assert out["pixel_values"].shape == (4, 3, 64, 64)
    single = processor(audio=_sine(200, 16000), images=Image.new("RGB", (5, 5)))
    assert single["input_values"].shape[0] == 1 and single["pixel_values"].shape[0] == 1


def test_processor_truncates_with_max_length(processor):
    out = processor(audio=[_sine(200, 16000, 1.0)], max_length=4000)
    assert out["input_values"].shape == (1, 4000)


@pytest.mark.parametrize(
    "audio, message",
    [
        ([np.zeros(0, dtype=np.float32)], "item 0 is empty"),
        ([_sine(100, 16000), np.full(100, np.nan, dtype=np.float32)], "item 1 contains NaN"),
        (["/no/such/file.wav"], r"item 0 \(/no/such/file.wav\) does not exist"),
        ([np.zeros((2, 3, 4), dtype=np.float32)], "expected \\[samples\\]"),
        ([{"text": "hi"}], "without 'array'"),
        ([42], "expected a file path"),
    ],
)
def test_bad_audio_raises_a_clear_error(processor, audio, message):
    with pytest.raises(ValueError, match=message):
        processor(audio=audio)


def test_unreadable_files_name_the_file(tmp_path, processor):
    fake_wav = tmp_path / "broken.wav"
    fake_wav.write_text("not audio")
    with pytest.raises(ValueError, match=r"broken.wav\) could not be read as an audio file"):
        processor(audio=[str(fake_wav)])
    fake_png = tmp_path / "broken.png"
    fake_png.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"image item 1 \(.*broken.png\) could not be read as an image"):
        processor(images=[Image.new("RGB", (4, 4)), str(fake_png)])
    with pytest.raises(ValueError, match="expected \\[H, W, 3\\]"):
        processor(images=[np.zeros((5, 5, 7), dtype=np.uint8)])


def test_processor_needs_some_input(processor):
    with pytest.raises(ValueError, match="needs audio"):
        processor()


def test_float_images_in_unit_range_equal_their_uint8_version(processor):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    as_uint8 = processor(images=[pixels])["pixel_values"]
    as_unit_float = processor(images=[pixels.astype(np.float32) / 255])["pixel_values"]
    assert torch.allclose(as_unit_float, as_uint8, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 16000), (16000, 2)])
def test_one_two_dimensional_audio_array_is_refused_as_ambiguous(processor, shape):
    with pytest.raises(ValueError, match=r"ambiguous between one multi-channel clip and a batch"):
        processor(audio=np.zeros(shape, dtype=np.float32))
    assert processor(audio=[np.zeros(shape, dtype=np.float32)])["input_values"].shape == (1, 16000)
