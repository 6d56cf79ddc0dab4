import pytest
import torch

from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.presets import tiny_config
from c2f.training import EmbeddingQueue, MomentumModel


def test_queue_wraps_around_and_exposes_only_filled_slots():
    queue = EmbeddingQueue(size=4, dim=2)
    assert queue.keys() is None
    queue.enqueue(torch.ones(3, 2), torch.ones(3, 2) * 2, torch.tensor([1, 2, 3]))
    speech, image, ids = queue.keys()
    assert speech.shape == (3, 2) and ids.tolist() == [1, 2, 3] and torch.all(image == 2)
    queue.enqueue(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([4, 5]))
    assert queue.keys()[2].tolist() == [5, 2, 3, 4] and queue.pointer == 1 and queue.filled == 4


def test_queue_state_round_trips_and_rejects_another_size():
    queue = EmbeddingQueue(size=4, dim=2)
    queue.enqueue(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([7, 8]))
    restored = EmbeddingQueue(size=4, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.speech, queue.speech) and (restored.pointer, restored.filled) == (2, 2)
    with pytest.raises(ValueError, match="queue_size"):
        EmbeddingQueue(size=8, dim=2).load_state_dict(queue.state_dict())
    with pytest.raises(ValueError, match="global batch"):
        queue.enqueue(torch.randn(5, 2), torch.randn(5, 2), torch.arange(5))


def test_momentum_model_is_an_ema_of_trainable_weights_and_shares_frozen_towers():
    model = C2FSpeechImageModel(tiny_config())
    momentum = MomentumModel(model, momentum=0.9)
    assert momentum.model.vision_model is model.vision_model  # frozen: shared, not copied
    assert momentum.model.speech_encoder is not model.speech_encoder
    before = momentum.model.speech_projection.weight.clone()
    with torch.no_grad():
        model.speech_projection.weight.add_(1.0)
    momentum.update()
    expected = 0.9 * before + 0.1 * model.speech_projection.weight
    assert torch.allclose(momentum.model.speech_projection.weight, expected)
    assert not any(p.requires_grad for p in momentum.model.speech_encoder.parameters())
    restored = MomentumModel(C2FSpeechImageModel(tiny_config()), momentum=0.9)
    restored.load_state_dict(momentum.state_dict())
    assert torch.equal(restored.model.speech_projection.weight, momentum.model.speech_projection.weight)


def test_momentum_model_leaves_out_the_parts_it_never_runs():
    model = C2FSpeechImageModel(tiny_config())
    momentum = MomentumModel(model, momentum=0.9, unused=("multimodal_encoder", "match_head"))
    assert not any(name.startswith(("momentum.multimodal_encoder.", "momentum.match_head.")) for name in momentum.state_dict())
    assert any(name.startswith("momentum.speech_encoder.") for name in momentum.state_dict())
    assert isinstance(momentum.model.match_head, torch.nn.Identity) and not isinstance(model.match_head, torch.nn.Identity)
    with torch.no_grad():  # it still embeds like the online model
        audio, images = torch.randn(2, 8000), torch.rand(2, 3, 64, 64)
        assert torch.allclose(momentum.model.get_speech_features(audio), model.eval().get_speech_features(audio))
        assert torch.allclose(momentum.model.get_image_features(images), model.get_image_features(images))
