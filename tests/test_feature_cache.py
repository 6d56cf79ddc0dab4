import torch

from c2f.data import SpeechImageCollator, load_demo
from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.presets import tiny_config
from c2f.training.feature_cache import ImageFeatureCache, backbone_fingerprint


def test_cache_holds_the_frozen_tower_output_and_feeds_the_collator(tmp_path, processor):
    model = C2FSpeechImageModel(tiny_config()).eval()
    model.test_time_views = False  # a cache holds one view of each image, the one training sees
    dataset = load_demo("validation").select(range(9))  # 3 images x 3 captions
    cache = ImageFeatureCache.build(model.vision_model, processor, dataset, tmp_path)
    assert len(cache) == 3
    records = [dataset[i] for i in (0, 4)]
    with torch.no_grad():
        pixels = processor(images=[r["image"] for r in records])["pixel_values"]
        expected = model.vision_model(pixel_values=pixels).last_hidden_state
    cached = SpeechImageCollator(processor, image_features=cache)(records)
    assert "pixel_values" not in cached and torch.equal(cached["image_hidden_states"], expected)
    with torch.no_grad():
        plain = SpeechImageCollator(processor)(records)
        from_pixels = model(plain["input_values"], plain["pixel_values"], plain["attention_mask"]).logits_per_speech
        from_cache = model(cached["input_values"], attention_mask=cached["attention_mask"],
                           image_hidden_states=cached["image_hidden_states"]).logits_per_speech
    assert torch.equal(from_pixels, from_cache)


def test_another_backbone_gets_another_cache_file(tmp_path, processor):
    dataset = load_demo("validation").select(range(3))
    first = C2FSpeechImageModel(tiny_config())
    second = C2FSpeechImageModel(tiny_config())
    with torch.no_grad():
        second.vision_model.post_layernorm.bias.add_(0.5)
    assert backbone_fingerprint(first.vision_model) != backbone_fingerprint(second.vision_model)
    path_first = ImageFeatureCache.build(first.vision_model, processor, dataset, tmp_path).path
    path_second = ImageFeatureCache.build(second.vision_model, processor, dataset, tmp_path).path
    assert path_first != path_second and path_first.exists() and path_second.exists()
    # A rebuild with the same backbone reuses the file.
    again = ImageFeatureCache.build(first.vision_model, processor, dataset, tmp_path)
    assert again.path == path_first


def test_the_same_tower_loaded_from_another_path_keeps_its_fingerprint(tmp_path, monkeypatch):
    from transformers import Blip2VisionModel

    C2FSpeechImageModel(tiny_config(vision_stem="patch")).vision_model.save_pretrained(tmp_path / "tower")
    monkeypatch.chdir(tmp_path)
    relative = Blip2VisionModel.from_pretrained("tower")
    absolute = Blip2VisionModel.from_pretrained(str(tmp_path / "tower"))
    assert relative.config.to_dict()["_name_or_path"] != absolute.config.to_dict()["_name_or_path"]
    assert backbone_fingerprint(relative) == backbone_fingerprint(absolute)


def test_frozen_hubert_cache_gives_the_embeddings_of_the_clips_alone(tmp_path, processor):
    import os
    import shutil

    import pytest

    from c2f.augmentation import SpeechAugmentation
    from c2f.training import C2FTrainer, C2FTrainingArguments
    from c2f.training.feature_cache import SpeechFeatureCache

    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config()).freeze_backbones(speech=True)
    model.train()
    assert not model.speech_model.training  # frozen: no dropout or masking, so the cache equals a live pass
    rows = load_demo("validation").select(range(6))
    cache = SpeechFeatureCache.build(model, processor, rows, tmp_path)
    assert len(cache) == 6
    batch = SpeechImageCollator(processor, speech_features=cache)([rows[i] for i in range(4)])
    assert "input_values" not in batch and batch["speech_hidden_states"].shape[:2] == batch["speech_frame_mask"].shape
    model.eval()
    model.test_time_views = False  # a cache holds one view of each clip, the one training hears
    with torch.no_grad():
        from_cache = model.get_speech_features(speech_hidden_states=batch["speech_hidden_states"],
                                               speech_frame_mask=batch["speech_frame_mask"])
        for row in range(4):
            alone = processor(audio=[rows[row]["audio"]])
            assert torch.allclose(from_cache[row], model.get_speech_features(alone["input_values"])[0], atol=1e-5)
    with pytest.raises(ValueError, match="voice augmentation every epoch hears them changed"):
        SpeechImageCollator(processor, speech_features=cache, augmentation=SpeechAugmentation())
    # Another recording under the same path (new size and time) is another cache file.
    copy = tmp_path / "clip.ogg"
    shutil.copy(rows[0]["audio"], copy)
    first = SpeechFeatureCache.build(model, processor, rows.select([0]).map(lambda r: {"audio": str(copy)}), tmp_path).path
    os.utime(copy, ns=(1, 1))
    assert SpeechFeatureCache.build(model, processor, rows.select([0]).map(lambda r: {"audio": str(copy)}), tmp_path).path != first
    # And training reads it: one step of the full recipe from cached frames.
    args = C2FTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=6,
                                queue_size=6, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = C2FTrainer(model=model, args=args, train_dataset=rows, processor=processor,
                         data_collator=SpeechImageCollator(processor, speech_features=cache))
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
