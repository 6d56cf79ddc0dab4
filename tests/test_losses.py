"""The pure loss functions, checked against hand-written loops on small cases."""

import math

import pytest
import torch

from c2f.modeling_c2f import same_image_mask, sample_hard_negatives, sic_loss, sim_loss


def _reference_direction(queries, keys, query_ids, key_ids, temperature, soft=None, alpha=0.0):
    total = 0.0
    for row, query in enumerate(queries):
        logits = [sum(q * k for q, k in zip(query, key)) / temperature for key in keys]
        log_norm = math.log(sum(math.exp(value) for value in logits))
        positives = [col for col, key_id in enumerate(key_ids) if key_id == query_ids[row]]
        for col in range(len(keys)):
            target = (1 / len(positives) if col in positives else 0.0) * (1 - alpha)
            if soft is not None:
                target += alpha * soft[row][col]
            total -= target * (logits[col] - log_norm)
    return total / len(queries)


def test_sic_loss_treats_other_captions_of_the_same_image_as_positives():
    speech = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    # Rows 0 and 1 are two views of the same image (id 7); speech 0 is closest to the second view.
    images = [[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]
    ids = [7, 7, 3]
    loss, logits_s2i, _ = sic_loss(torch.tensor(speech), torch.tensor(images), torch.tensor(ids), torch.tensor(0.5))
    expected = (
        _reference_direction(speech, images, ids, ids, 0.5) + _reference_direction(images, speech, ids, ids, 0.5)
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logits_s2i.shape == (3, 3)
    # Treating the other view as a negative (distinct ids) penalises speech 0 for its best match.
    distinct, _, _ = sic_loss(torch.tensor(speech), torch.tensor(images), torch.tensor([7, 8, 3]), torch.tensor(0.5))
    assert distinct.item() > loss.item() + 1e-3


def test_sic_loss_with_queue_keys_and_soft_targets_matches_reference():
    torch.manual_seed(0)
    speech = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    images = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    queue_speech = torch.nn.functional.normalize(torch.randn(3, 3), dim=1)
    queue_images = torch.nn.functional.normalize(torch.randn(3, 3), dim=1)
    ids, queue_ids = torch.tensor([1, 2]), torch.tensor([2, 5, 6])  # the queue holds another caption of image 2
    soft_s2i = torch.softmax(torch.randn(2, 5), dim=1)
    soft_i2s = torch.softmax(torch.randn(2, 5), dim=1)
    key_speech, key_images, key_ids = torch.cat([speech, queue_speech]), torch.cat([images, queue_images]), torch.cat([ids, queue_ids])
    loss, _, _ = sic_loss(speech, images, ids, torch.tensor(0.1), key_speech, key_images, key_ids, soft_s2i, soft_i2s, 0.4)
    expected = (
        _reference_direction(speech.tolist(), key_images.tolist(), ids.tolist(), key_ids.tolist(), 0.1, soft_s2i.tolist(), 0.4)
        + _reference_direction(images.tolist(), key_speech.tolist(), ids.tolist(), key_ids.tolist(), 0.1, soft_i2s.tolist(), 0.4)
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_sic_loss_rejects_keys_without_the_batch():
    embeds = torch.eye(2)
    with pytest.raises(ValueError, match="own pair"):
        sic_loss(embeds, embeds, torch.tensor([0, 1]), torch.tensor(1.0), embeds, embeds, torch.tensor([5, 6]))


def test_hard_negatives_never_pick_the_same_image_and_follow_similarity():
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    positives = same_image_mask(ids, ids)
    logits = torch.zeros(6, 6)
    logits[:, 3] += 2.0  # make image 3 (id 2) the most confusable for every row that may pick it
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, 6)
    for _ in range(500):
        picked = sample_hard_negatives(logits, positives, generator)
        assert not positives[torch.arange(6), picked].any()
        counts[torch.arange(6), picked] += 1
    assert counts[0, 3] > counts[0, 2] and counts[0, 3] > counts[0, 5]


def test_hard_negatives_mark_rows_without_any_negative():
    ids = torch.tensor([4, 4])
    picked = sample_hard_negatives(torch.zeros(2, 2), same_image_mask(ids, ids))
    assert picked.tolist() == [-1, -1]


def test_sim_loss_is_cross_entropy_on_match_labels():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([1, 0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-2.0))) / 2
    assert sim_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
