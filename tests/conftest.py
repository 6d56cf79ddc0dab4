import numpy as np
import pytest
import torch

from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.presets import tiny_config, tiny_processor


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return C2FSpeechImageModel(config)


@pytest.fixture
def processor():
    return tiny_processor()


@pytest.fixture
def batch(processor):
    """Four clips of different lengths (so padding is exercised) with four images, two showing the same image."""
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8000, 6400, 9600, 4800)]
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    images[1] = images[0]
    features = processor(audio=audio, images=images, sampling_rate=16000)
    features["image_ids"] = torch.tensor([0, 0, 1, 2])
    return features


@pytest.fixture
def one_thread():
    """Multi-threaded CPU conv backward sums in a varying order; Adam turns those last-bit differences in near-zero
    gradients into visible weight differences. One thread makes two runs comparable bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
