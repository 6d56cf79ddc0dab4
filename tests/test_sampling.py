"""Neighbour batches: each anchor clip is followed by a clip of an image with a near caption, drawn reproducibly."""

import pytest
import torch

from c2f.data import load_demo
from c2f.training.sampling import NeighbourBatchSampler, caption_neighbours


def test_nearest_captions_share_the_most_weighted_words():
    captions = {
        0: ["a big red circle above a small blue square"],
        1: ["a small blue square above a big red circle"],  # same words, other order: the hardest neighbour
        2: ["a big red circle above a small green square"],  # one word changed
        3: ["a small yellow triangle"],
    }
    neighbours = caption_neighbours(captions, count=2)
    assert neighbours[0] == [1, 2]
    assert neighbours[3][0] in (0, 1, 2) and 3 not in neighbours[3]
    # Blocks of rows give the same answer as one block.
    assert caption_neighbours(captions, count=2, block=1) == neighbours


def test_sampler_pairs_each_anchor_with_a_neighbour_and_is_seeded_by_epoch():
    dataset = load_demo("validation")
    sampler = NeighbourBatchSampler(dataset["image_id"], dataset["caption"], batch_size=8, seed=3, neighbours=2)
    rows = list(sampler)
    assert len(rows) == len(sampler) == len(dataset) // 2 * 2
    image_ids = dataset["image_id"]
    for anchor, partner in zip(rows[::2], rows[1::2]):
        assert image_ids[partner] in sampler.neighbours[image_ids[anchor]]
        assert image_ids[partner] != image_ids[anchor]
    assert list(sampler) == rows  # same epoch, same draw
    sampler.set_epoch(1)
    assert list(sampler) != rows
    again = NeighbourBatchSampler(dataset["image_id"], dataset["caption"], batch_size=8, seed=3, neighbours=2)
    again.set_epoch(1)
    assert list(again) == list(sampler)


def test_sampler_refuses_what_it_cannot_pair():
    with pytest.raises(ValueError, match="caption"):
        NeighbourBatchSampler([0, 0, 1, 1], ["", "", "", ""], batch_size=4)
    with pytest.raises(ValueError, match="even per-device batch size"):
        NeighbourBatchSampler([0, 1], ["a red circle", "a blue square"], batch_size=3)


def test_trainer_draws_neighbour_batches(tmp_path):
    from c2f.data import SpeechImageCollator
    from c2f.modeling_c2f import C2FSpeechImageModel
    from c2f.presets import tiny_config, tiny_processor
    from c2f.training import C2FTrainer, C2FTrainingArguments

    dataset = load_demo("validation").select(range(24))
    processor = tiny_processor()
    args = C2FTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, queue_size=8,
                                neighbour_batches=True, batch_neighbours=1, report_to="none", use_cpu=True, seed=5)
    trainer = C2FTrainer(model=C2FSpeechImageModel(tiny_config()), args=args, train_dataset=dataset,
                         data_collator=SpeechImageCollator(processor), processor=processor)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, NeighbourBatchSampler)
    batch = next(iter(trainer.get_train_dataloader()))
    ids = batch["image_ids"].tolist()
    assert ids[1] == sampler.neighbours[ids[0]][0] and ids[3] == sampler.neighbours[ids[2]][0]
    trainer.train()
    assert torch.isfinite(torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])).all()


def test_demo_batches_pair_each_anchor_with_its_arrangement_twin():
    """The demo's default (nearest caption only) meets an image's same-words twin whenever the image is an anchor."""
    from c2f.train import DataArguments, RunArguments, apply_dataset_defaults

    demo = RunArguments(output_dir="unused", report_to="none", use_cpu=True)
    apply_dataset_defaults(demo, DataArguments())
    assert (demo.neighbour_batches, demo.batch_neighbours) == (True, 1)
    other = RunArguments(output_dir="unused", report_to="none", use_cpu=True, batch_neighbours=2)
    apply_dataset_defaults(other, DataArguments(dataset="flickr8k"))
    assert (other.neighbour_batches, other.batch_neighbours) == (False, 2)

    dataset = load_demo("train")
    image_ids, captions = dataset["image_id"], dataset["caption"]
    words = {image: sorted(caption.split()) for image, caption in zip(image_ids, captions)}
    twins = {image: {other for other, bag in words.items() if other != image and bag == bag_of}
             for image, bag_of in words.items()}
    sampler = NeighbourBatchSampler(image_ids, captions, batch_size=32, seed=0, neighbours=demo.batch_neighbours)
    rows = list(sampler)
    paired = [(image_ids[a], image_ids[p]) for a, p in zip(rows[::2], rows[1::2]) if twins[image_ids[a]]]
    assert len(paired) > 50
    assert all(partner in twins[anchor] for anchor, partner in paired)
