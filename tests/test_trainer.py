"""C2FTrainer on a few real demo clips: the loss moves, checkpoints carry the queue, resume is exact."""

import os

import pytest
import torch
from safetensors.torch import load_file

from c2f.augmentation import ImageAugmentation, SpeechAugmentation
from c2f.data import SpeechImageCollator, load_demo, with_mirror_axes
import c2f.training.trainer as trainer_module
from c2f.modeling_c2f import C2FSpeechImageModel, sic_loss
from c2f.presets import tiny_config, tiny_processor
from c2f.training import C2FTrainer, C2FTrainingArguments
from c2f.training.trainer import STATE_FILE, last_complete_checkpoint


def _trainer(output_dir, max_steps, save_steps=None, augmentation=None, image_augmentation=None, **overrides):
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config(hidden_dropout=0.0))
    processor = tiny_processor()
    settings = dict(per_device_train_batch_size=4, queue_size=8, seed=7, data_seed=7)
    settings.update(overrides)
    args = C2FTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=1e-3,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_steps=1, report_to="none", use_cpu=True, dataloader_num_workers=0,
        **settings,
    )
    return C2FTrainer(model=model, args=args, train_dataset=load_demo("validation").select(range(16)),
                      data_collator=SpeechImageCollator(processor, augmentation=augmentation,
                                                        image_augmentation=image_augmentation),
                      processor=processor)


def test_training_fills_the_queue_and_updates_the_momentum_model(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    initial = trainer.model.speech_projection.weight.detach().clone()
    trainer.train()
    assert trainer.queue.filled == 8 and (trainer.queue.image_ids >= 0).all()
    momentum_weight = trainer.momentum_model.model.speech_projection.weight
    online_weight = trainer.model.speech_projection.weight
    assert not torch.equal(momentum_weight, initial) and not torch.equal(momentum_weight, online_weight)
    assert trainer.current_alpha() > 0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # Each log also shows the parts: SIC, SIM, temperature, alpha, queue fill (the trained loss is SIC + w * SIM).
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert abs(last["loss_sic"] + trainer.args.sim_loss_weight * last["loss_sim"] - last["loss"]) < 1e-3
    assert 0 < last["temperature"] < 1 and last["alpha"] > 0 and last["queue_fill"] == 8


def test_momentum_start_holds_back_the_queue_and_distillation(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=4, momentum_start_epochs=0.5)  # 4 steps an epoch: they join at step 2
    seen = []

    def recording_sic_loss(speech, image, ids, temperature, key_speech, key_image, key_ids, *targets, distill_alpha):
        seen.append((len(key_ids), distill_alpha))
        return sic_loss(speech, image, ids, temperature, key_speech, key_image, key_ids, *targets, distill_alpha=distill_alpha)

    monkeypatch.setattr(trainer_module, "sic_loss", recording_sic_loss)
    trainer.train()
    assert [keys for keys, _ in seen] == [4, 4, 4 + 8, 4 + 8]  # the batch alone, then the batch and the full queue
    assert [alpha for _, alpha in seen][:3] == [0.0, 0.0, 0.0] and seen[3][1] > 0  # the ramp starts at step 2
    assert trainer.queue.filled == 8  # filled from the first step, so it is full when it joins


@pytest.mark.parametrize("distill_temperature", [None, 0.3])
def test_soft_targets_use_the_distillation_temperature(tmp_path, monkeypatch, distill_temperature):
    """By default the soft targets are softmaxed at the online temperature (ALBEF); `distill_temperature` fixes it."""
    trainer = _trainer(tmp_path, max_steps=3, distill_temperature=distill_temperature)
    seen, targets = [], trainer_module.distillation_targets

    def recording(speech, image, keys, temperature):
        seen.append(float(temperature))
        return targets(speech, image, keys, temperature)

    monkeypatch.setattr(trainer_module, "distillation_targets", recording)
    trainer.train()
    online = float(trainer.model.get_temperature().detach())
    assert len(seen) == 2  # alpha ramps from 0: no targets at the first step
    if distill_temperature is None:
        assert seen[-1] == pytest.approx(online, rel=0.05) and seen[-1] != 0.3
    else:
        assert seen == pytest.approx([0.3, 0.3]) and abs(online - 0.3) > 0.1
    with pytest.raises(ValueError, match="--distill_temperature must be a positive temperature, got 0"):
        C2FTrainingArguments(output_dir=str(tmp_path), distill_temperature=0)


def test_neighbour_batches_are_drawn_from_the_data_seed(tmp_path):
    for overrides, expected in (({}, 7), ({"data_seed": 11}, 11)):
        settings = {"seed": 7, "data_seed": None, **overrides}
        trainer = _trainer(tmp_path, max_steps=1, neighbour_batches=True, **settings)
        assert trainer._get_train_sampler().seed == expected and trainer.args.draw_seed == expected


def test_sim_image_queue_adds_candidates_for_the_clips_negatives(tmp_path, monkeypatch):
    import c2f.modeling_c2f as modeling

    trainer = _trainer(tmp_path, max_steps=3, sim_queue_negatives=6)
    widths, sample = [], modeling.sample_hard_negatives

    def recording(logits, positive_mask, generator=None):
        assert positive_mask.shape == logits.shape
        widths.append(logits.shape[1])
        return sample(logits, positive_mask, generator)

    monkeypatch.setattr(modeling, "sample_hard_negatives", recording)
    trainer.train()
    # Each step: the clips' candidate images (the batch of 4, then the images queued so far), then each image's
    # candidate clips (the batch alone).
    assert widths == [4, 4, 4 + 4, 4, 4 + 6, 4]
    tokens, embeds, ids = trainer.sim_queue.items()
    assert tokens.shape[0] == embeds.shape[0] == len(ids) == 6 and (ids >= 0).all()
    without_sim = _trainer(tmp_path / "no-sim", max_steps=1, use_sim=False, sim_queue_negatives=6)
    without_sim._ensure_training_state()
    assert without_sim.sim_queue is None  # nothing would read it


def test_mirror_negatives_are_the_batch_images_mirrored_as_their_captions_say(tmp_path, monkeypatch):
    import c2f.modeling_c2f as modeling

    trainer = _trainer(tmp_path, max_steps=2, mirror_negatives=True)
    trainer.train_dataset = with_mirror_axes(trainer.train_dataset, "demo")
    pixels = torch.rand(3, 3, 64, 64)
    inputs = {"pixel_values": pixels, "image_ids": torch.tensor([5, 6, 7]), "mirror_axes": torch.tensor([1, 0, 2])}
    model = trainer.model.eval()
    tokens, embeds, ids = trainer._mirror_negatives(model, inputs)
    with torch.no_grad():
        expected = model.encode_image(torch.stack([pixels[0].flip(-1), pixels[2].flip(-2)]), average_views=False)
    assert torch.allclose(tokens, expected.image_tokens, atol=1e-5) and torch.allclose(embeds, expected.image_embeds, atol=1e-5)
    assert ids.tolist() == [-6, -8] and tokens.requires_grad  # ids of no real image; the tower learns from them
    assert trainer._mirror_negatives(model, {**inputs, "mirror_axes": torch.zeros(3, dtype=torch.long)}) is None

    widths, sample = [], modeling.sample_hard_negatives

    def recording(logits, positive_mask, generator=None):
        widths.append(logits.shape[1])
        return sample(logits, positive_mask, generator)

    monkeypatch.setattr(modeling, "sample_hard_negatives", recording)
    model.train()
    trainer.train()
    # Each step: the clips' candidate images (the batch of 4 and its mirrorable images), then each image's clips.
    assert widths[1::2] == [4, 4] and all(width >= 4 for width in widths[0::2]) and max(widths[0::2]) > 4
    with pytest.raises(ValueError, match="mirror_axes"):
        trainer._mirror_negatives(model, {"pixel_values": pixels, "image_ids": torch.tensor([5, 6, 7])})


def test_resume_from_checkpoint_is_exact(tmp_path, one_thread):
    """With voice and image augmentation on (their draws are numbered by batch and continue from the checkpoint's
    step) and neighbour batches (drawn by epoch, the resumed epoch's first batches skipped)."""
    def trainer(folder, save_steps=None):
        return _trainer(tmp_path / folder, max_steps=6, save_steps=save_steps, augmentation=SpeechAugmentation(),
                        image_augmentation=ImageAugmentation(seed=1), weight_ema=0.9, neighbour_batches=True,
                        sim_queue_negatives=6)

    straight = trainer("straight")
    straight.train()

    first_half = trainer("resumed", save_steps=2)
    first_half.train()  # saves checkpoints 2, 4 and 6; resume from the first, inside the first epoch of 4 steps
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    state = load_file(checkpoint / STATE_FILE)
    assert int(state["queue.filled"]) == 8 and any(name.startswith("momentum.") for name in state)
    assert int(state["weight_ema.updates"]) == 2 and any(name.startswith("weight_ema.speech") for name in state)
    assert not any(name.endswith(".tmp") for name in os.listdir(checkpoint))

    resumed = trainer("resumed", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(expected, actual, atol=1e-6), name
    assert torch.allclose(straight.queue.speech, resumed.queue.speech, atol=1e-6)
    assert torch.equal(straight.queue.image_ids, resumed.queue.image_ids)
    assert torch.equal(straight.sim_queue.image_ids, resumed.sim_queue.image_ids)
    assert torch.allclose(straight.sim_queue.tokens, resumed.sim_queue.tokens, atol=1e-6)
    for (name, expected), actual in zip(straight.momentum_model.state_dict().items(), resumed.momentum_model.state_dict().values()):
        assert torch.allclose(expected, actual, atol=1e-6), name


def test_a_queue_of_any_size_from_the_batch_up_works(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, queue_size=6)  # not a multiple of the batch of 4
    trainer.train()
    assert trainer.queue.filled == 6 and trainer.queue.pointer == (3 * 4) % 6


def test_incomplete_checkpoints_are_refused_and_passed_over(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, save_steps=2, save_total_limit=1)
    trainer.train()
    # c2f's state is written before Trainer rotates old checkpoints: the one left holds it.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / STATE_FILE).is_file()
    trainer = _trainer(tmp_path, max_steps=6, save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    for name in (STATE_FILE, "optimizer.pt", "trainer_state.json"):  # a kill while saving or rotating
        os.remove(tmp_path / "checkpoint-6" / name)
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
        with pytest.raises(ValueError, match=rf"not a complete C2FTrainer checkpoint \(missing: .*{name}.*resume from .*checkpoint-4"):
            _trainer(tmp_path, max_steps=8, save_steps=2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_loss_falls_over_a_short_run(tmp_path):
    trainer = _trainer(tmp_path, max_steps=40, use_queue=False, use_distillation=False, use_sim=False,
                       per_device_train_batch_size=8)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_no_momentum_model_when_nothing_reads_it(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, use_queue=False, use_distillation=False)
    trainer.train()
    assert trainer.momentum_model is None and trainer.queue is None


def test_epoch_schedules_count_trainer_epochs_with_max_steps_and_fractional_epochs(tmp_path):
    """16 clips in batches of 4 make 4-step epochs, whatever max_steps or num_train_epochs say."""
    for settings in (dict(max_steps=6), dict(max_steps=-1, num_train_epochs=1.5)):
        max_steps = settings.pop("max_steps")
        trainer = _trainer(tmp_path, max_steps=max_steps, **settings)
        assert trainer.optimizer_steps(1.0) == 4 and trainer.optimizer_steps(0.5) == 2


def test_queue_fills_only_in_the_steps_before_it_joins(tmp_path):
    # 4-step epochs; the queue (8 = two batches) joins at step 6, so it fills from step 4 on.
    trainer = _trainer(tmp_path, max_steps=8, momentum_start_epochs=1.5, use_distillation=False)
    filled = []
    trainer.model.register_forward_pre_hook(lambda module, args: filled.append(trainer.queue.filled))
    trainer.train()
    assert filled == [0, 0, 0, 0, 0, 4, 8, 8]


def test_weight_ema_replaces_the_last_weights_at_the_end(tmp_path):
    from transformers import TrainerCallback

    trainer = _trainer(tmp_path, max_steps=3, weight_ema=0.9)
    last = {}

    class LastWeights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            last.update({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})

    trainer.add_callback(LastWeights())
    before = trainer.model.speech_projection.weight.detach().clone()
    trainer.train()
    ema = trainer.weight_ema.model.speech_projection.weight
    assert torch.equal(trainer.model.speech_projection.weight, ema)
    assert not torch.equal(ema, last["speech_projection.weight"]) and not torch.equal(ema, before)
    # With warm-up the first factors are 0.1, 0.18, 0.25 (not 0.9): three steps move the average most of the way.
    assert trainer.weight_ema.updates == 3
    distance_to_last = (ema - last["speech_projection.weight"]).norm()
    assert distance_to_last < (before - last["speech_projection.weight"]).norm()
