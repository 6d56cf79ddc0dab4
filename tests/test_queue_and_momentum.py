import pytest
import torch

from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.presets import tiny_config
from c2f.training import EmbeddingQueue, MomentumModel
from c2f.training.contrastive import contrastive_keys, distillation_targets


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
    model = C2FSpeechImageModel(tiny_config()).freeze_backbones(image=True)
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
    restored = MomentumModel(C2FSpeechImageModel(tiny_config()).freeze_backbones(image=True), momentum=0.9)
    restored.load_state_dict(momentum.state_dict())
    assert torch.equal(restored.model.speech_projection.weight, momentum.model.speech_projection.weight)


def test_momentum_model_leaves_out_the_parts_it_never_runs():
    model = C2FSpeechImageModel(tiny_config())
    momentum = MomentumModel(model, momentum=0.9, unused=("multimodal_encoder", "match_head"))
    assert not any(name.startswith(("momentum.multimodal_encoder.", "momentum.match_head.")) for name in momentum.state_dict())
    assert any(name.startswith("momentum.speech_encoder.") for name in momentum.state_dict())
    assert isinstance(momentum.model.match_head, torch.nn.Identity) and not isinstance(model.match_head, torch.nn.Identity)
    with torch.no_grad():  # it still embeds like the online model, from the one view training sees
        audio, images = torch.randn(2, 8000), torch.rand(2, 3, 64, 64)
        with_views = model.eval().get_speech_features(audio), model.get_image_features(images)
        model.test_time_views = False
        assert torch.allclose(momentum.model.get_speech_features(audio), model.get_speech_features(audio))
        assert torch.allclose(momentum.model.get_image_features(images), model.get_image_features(images))
        assert not torch.allclose(momentum.model.get_speech_features(audio), with_views[0])
        assert not torch.allclose(momentum.model.get_image_features(images), with_views[1])


def test_soft_targets_and_logits_share_their_keys_column_for_column():
    torch.manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape), dim=-1)
    online_speech, online_image = unit(3, 8), unit(3, 8)
    ids = torch.tensor([4, 5, 6])
    queue = EmbeddingQueue(size=5, dim=8)
    queue.enqueue(unit(4, 8), unit(4, 8), torch.tensor([7, 8, 9, 4]))  # another caption of image 4 is queued
    online = contrastive_keys(online_speech, online_image, ids, queue.keys())
    # A momentum model equal to the online one: its soft targets are the online softmax over the very same keys.
    momentum = contrastive_keys(online_speech.clone(), online_image.clone(), ids, queue.keys())
    speech_to_image, image_to_speech = distillation_targets(online_speech, online_image, momentum, torch.tensor(0.1))
    assert torch.equal(online.image_ids, torch.tensor([4, 5, 6, 7, 8, 9, 4]))
    assert torch.allclose(speech_to_image, (online_speech @ online.image.t() / 0.1).softmax(dim=1))
    assert torch.allclose(image_to_speech, (online_image @ online.speech.t() / 0.1).softmax(dim=1))
    assert torch.allclose(speech_to_image.sum(dim=1), torch.ones(3))
    assert contrastive_keys(online_speech, online_image, ids).image_ids is ids  # no queue: the batch alone


def test_sim_image_queue_wraps_sizes_itself_at_the_first_batch_and_round_trips():
    from c2f.training import ImageTokenQueue

    queue = ImageTokenQueue(5)
    assert queue.items() is None and set(queue.state_dict()) == {"sim_queue.pointer", "sim_queue.filled"}
    for step in range(3):  # 3 batches of 2 into 5 slots: the first image is overwritten
        tokens = torch.full((2, 3, 4), float(step))
        queue.enqueue(tokens, torch.full((2, 8), float(step)), torch.tensor([10 * step, 10 * step + 1]))
    tokens, embeds, ids = queue.items()
    assert tokens.shape == (5, 3, 4) and embeds.shape == (5, 8)
    assert ids.tolist() == [21, 1, 10, 11, 20] and tokens[0].eq(2).all() and tokens[1].eq(0).all()
    restored = ImageTokenQueue(5)
    restored.load_state_dict(queue.state_dict())
    assert restored.pointer == 1 and all(torch.equal(a, b) for a, b in zip(restored.items(), queue.items()))
    with pytest.raises(ValueError, match="sim_queue_negatives must match"):
        ImageTokenQueue(6).load_state_dict(queue.state_dict())
    with pytest.raises(ValueError, match="without --sim_queue_negatives"):
        ImageTokenQueue(5).load_state_dict({"queue.filled": torch.tensor(0)})
    with pytest.raises(ValueError, match=r"sim_queue_negatives \(5\) must be at least"):
        queue.enqueue(torch.zeros(6, 3, 4), torch.zeros(6, 8), torch.arange(6))
