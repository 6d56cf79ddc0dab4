"""Loaders on tiny fixture trees laid out exactly like the real releases."""

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from c2f.data import (SpeechImageCollator, with_audio_lengths, load_demo, load_flickr8k, load_manifest, load_speech_image_dataset,
                      load_spokencoco, validate_records, with_mirror_axes)
from c2f.demo.scenes import LEFT_RIGHT_MIRROR, NO_MIRROR, UP_DOWN_MIRROR, mirror_axis


def _wav(path, seconds=0.3):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.random.default_rng(0).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1, 16000)


def _jpg(path, color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path)


@pytest.fixture
def flickr_root(tmp_path):
    images = {"train": ["1000_a.jpg", "1001_b.jpg"], "dev": ["1002_c.jpg"], "test": ["1003_d.jpg"]}
    lines = []
    for split, names in images.items():
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("".join(n + "\n" for n in names))
        for name in names:
            _jpg(tmp_path / "Flicker8k_Dataset" / name)
            for n in range(2):
                wav = f"{name[:-4]}_{n}.wav"
                _wav(tmp_path / "flickr_audio" / "wavs" / wav)
                lines.append(f"{wav} {name} #{n}")
    (tmp_path / "flickr_audio" / "wav2capt.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_flickr8k_loader_reads_the_release_layout(flickr_root):
    train = load_flickr8k(flickr_root, "train")
    assert len(train) == 4 and sorted(set(train["image_id"])) == [0, 1]
    assert train[0]["audio"].endswith("flickr_audio/wavs/1000_a_0.wav") and train[0]["image"].endswith("Flicker8k_Dataset/1000_a.jpg")
    assert len(load_flickr8k(flickr_root, "validation")) == 2 and len(load_flickr8k(flickr_root, "test")) == 2
    validate_records(train, "flickr8k train")


def test_flickr8k_missing_release_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="Flickr_8k.trainImages.txt not found"):
        load_flickr8k(tmp_path, "train")


def test_spokencoco_loader_reads_the_release_json(tmp_path):
    data = {"data": [
        {"image": "val2014/COCO_val2014_1.jpg", "captions": [
            {"text": "a dog", "speaker": "s1", "uttid": "u1", "wav": "wavs/val/0/u1.wav"},
            {"text": "a puppy", "speaker": "s2", "uttid": "u2", "wav": "wavs/val/0/u2.wav"}]},
        {"image": "val2014/COCO_val2014_2.jpg", "captions": [
            {"text": "a cat", "speaker": "s1", "uttid": "u3", "wav": "wavs/val/0/u3.wav"}]},
    ]}
    (tmp_path / "SpokenCOCO").mkdir()
    (tmp_path / "SpokenCOCO" / "SpokenCOCO_val.json").write_text(json.dumps(data))
    for entry in data["data"]:
        _jpg(tmp_path / entry["image"])
        for caption in entry["captions"]:
            _wav(tmp_path / "SpokenCOCO" / caption["wav"])
    dataset = load_spokencoco(tmp_path, "test")
    assert dataset["image_id"] == [0, 0, 1] and dataset["caption"] == ["a dog", "a puppy", "a cat"]
    assert dataset["speaker"] == ["s1", "s2", "s1"]
    validate_records(dataset, "spokencoco test")


def test_manifest_csv_with_string_ids_and_relative_paths(tmp_path):
    _wav(tmp_path / "a.wav"); _wav(tmp_path / "b.wav"); _jpg(tmp_path / "x.png")
    (tmp_path / "m.csv").write_text("audio,image,image_id,caption\na.wav,x.png,cat-1,hello\nb.wav,x.png,cat-1,hi\n")
    dataset = load_manifest(tmp_path / "m.csv")
    assert dataset["image_id"] == [0, 0] and dataset["audio"][1] == str(tmp_path / "b.wav")
    (tmp_path / "bad.jsonl").write_text('{"audio": "a.wav", "image_id": 3}\n')
    with pytest.raises(ValueError, match=r"row 1: missing field\(s\) \['image'\]"):
        load_manifest(tmp_path / "bad.jsonl")


def test_validation_lists_the_first_offenders_and_the_count(tmp_path):
    _wav(tmp_path / "ok.wav"); _jpg(tmp_path / "ok.png")
    (tmp_path / "broken.wav").write_text("nope")
    rows = [dict(audio="ok.wav", image="ok.png", image_id=0), dict(audio="broken.wav", image="ok.png", image_id=0),
            dict(audio="gone.wav", image="gone.png", image_id=1)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"3 bad file\(s\)") as error:
        validate_records(load_manifest(tmp_path / "m.jsonl"), "mine")
    assert "broken.wav: unreadable" in str(error.value) and "gone.wav: missing" in str(error.value)
    assert "gone.png: missing" in str(error.value)
    (tmp_path / "train_only.jsonl").write_text(json.dumps({**rows[0], "split": "train"}) + "\n")
    with pytest.raises(ValueError, match="split 'test'.*empty"):
        load_manifest(tmp_path / "train_only.jsonl", split="test")


def test_manifest_rows_without_a_split_are_refused_when_a_split_is_asked(tmp_path):
    _wav(tmp_path / "a.wav"); _jpg(tmp_path / "x.png")
    row = dict(audio="a.wav", image="x.png", image_id=0)
    (tmp_path / "m.jsonl").write_text(json.dumps({**row, "split": "train"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"1 row\(s\) have no 'split' \(first: row 2\); asked for split 'test'"):
        load_manifest(tmp_path / "m.jsonl", split="test")
    assert len(load_manifest(tmp_path / "m.jsonl")) == 2  # no split asked: the whole manifest


def test_shipped_demo_splits_hold_out_voices_and_colour_shape_pairs():
    train, test = load_demo("train"), load_demo("test")
    assert len(train) > 1000 and len(test) > 300 and len(load_demo("validation")) > 100
    assert not set(train["speaker"]) & set(test["speaker"])
    held_out = ("purple triangle", "yellow circle", "green square")
    assert not any(pair in caption for caption in train["caption"] for pair in held_out)
    assert all(any(pair in caption for pair in held_out) for caption in test["caption"])
    assert not set(train["image_id"]) & set(test["image_id"])
    unseen = load_demo("validation_unseen_voices")
    assert len(unseen) == 240 and not set(unseen["speaker"]) & (set(train["speaker"]) | set(test["speaker"]))
    assert not set(unseen["image_id"]) & (set(train["image_id"]) | set(test["image_id"]))
    shifted = load_speech_image_dataset("demo-shifted", "test")
    assert len(shifted) > 100 and not set(shifted["speaker"]) & set(train["speaker"])


def test_collator_batches_demo_records(processor):
    records = [load_demo("validation")[i] for i in range(3)]
    batch = SpeechImageCollator(processor)(records)
    assert batch["input_values"].shape[0] == 3 and batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["image_ids"].dtype == torch.long and batch["attention_mask"].sum(dim=1).min() > 8000


@pytest.mark.parametrize("caption, axis", [
    ("a big red circle", NO_MIRROR),
    ("a big red circle to the left of a small blue square", LEFT_RIGHT_MIRROR),
    ("a small blue square above a big red circle", UP_DOWN_MIRROR),
    ("a big red circle to the left of a big red circle", NO_MIRROR),  # reads the same mirrored
    ("a big blue circle, a big green triangle and a big blue circle, from left to right", NO_MIRROR),
    ("a big blue circle, a big green triangle and a small blue circle, from left to right", LEFT_RIGHT_MIRROR),
])
def test_mirror_axis_names_the_mirror_a_demo_caption_contradicts(caption, axis):
    assert mirror_axis(caption) == axis


def test_mirror_axes_come_from_demo_captions_or_from_the_data(processor):
    demo = with_mirror_axes(load_demo("validation"), "demo")
    assert demo["mirror_axis"] == [mirror_axis(caption) for caption in demo["caption"]]
    assert {NO_MIRROR, LEFT_RIGHT_MIRROR, UP_DOWN_MIRROR} <= set(demo["mirror_axis"])
    batch = SpeechImageCollator(processor)([demo[i] for i in range(4)])
    assert batch["mirror_axes"].tolist() == demo["mirror_axis"][:4]
    given = load_demo("validation").add_column("mirror_axis", [0] * len(demo))
    assert with_mirror_axes(given, "my-data")["mirror_axis"] == [0] * len(demo)  # a column the data brings is kept
    with pytest.raises(ValueError, match="mirror_axis"):
        with_mirror_axes(load_demo("validation"), "my-data")


def test_hub_style_dataset_with_audio_and_image_features(tmp_path, processor):
    from datasets import Audio, Dataset, DatasetDict, Features, Image as ImageFeature, Value

    _wav(tmp_path / "a.wav"); _wav(tmp_path / "b.wav", seconds=0.5)
    _jpg(tmp_path / "x.png"); _jpg(tmp_path / "y.png", color="blue")
    # datasets imports torchcodec to *encode* audio, so build the column as Arrow storage and cast it: this is the
    # shape a downloaded Hub dataset has.
    storage = Features({"audio": {"bytes": Value("binary"), "path": Value("string")}, "image": ImageFeature(),
                        "image_id": Value("int64")})
    rows = {"audio": [{"path": str(p), "bytes": p.read_bytes()} for p in (tmp_path / "a.wav", tmp_path / "b.wav")],
            "image": [str(tmp_path / "x.png"), str(tmp_path / "y.png")], "image_id": [10, 11]}
    hub_dataset = Dataset.from_dict(rows, features=storage).cast_column("audio", Audio(decode=False))
    DatasetDict({"test": hub_dataset}).save_to_disk(tmp_path / "hub")
    dataset = load_speech_image_dataset(str(tmp_path / "hub"), "test")
    validate_records(dataset, "hub test")
    batch = SpeechImageCollator(processor)([dataset[0], dataset[1]])
    assert batch["attention_mask"].sum(dim=1).tolist() == [4800, 8000]
    assert batch["image_ids"].tolist() == [10, 11] and batch["pixel_values"].shape == (2, 3, 64, 64)
    Dataset.from_dict({"audio": ["a.wav"]}).save_to_disk(tmp_path / "bad" / "test")
    (tmp_path / "bad" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image', 'image_id'\]"):
        load_speech_image_dataset(str(tmp_path / "bad"), "test")


def test_audio_lengths_for_length_grouped_batches(tmp_path):
    from datasets import Dataset

    _wav(tmp_path / "a.wav"); _wav(tmp_path / "b.wav", seconds=0.5)
    paths = Dataset.from_dict({"audio": [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]})
    assert with_audio_lengths(paths)["length"] == [4800, 8000]
    encoded = Dataset.from_dict({"audio": [{"path": "b.wav", "bytes": (tmp_path / "b.wav").read_bytes()}]})
    assert with_audio_lengths(encoded)["length"] == [8000]
    decoded = Dataset.from_dict({"audio": [{"array": np.zeros(123), "sampling_rate": 16000}]})
    assert with_audio_lengths(decoded)["length"] == [123]
    (tmp_path / "c.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match=r"audio .*c\.wav: unreadable"):
        with_audio_lengths(Dataset.from_dict({"audio": [str(tmp_path / "c.wav")]}))


def test_validation_decodes_what_a_header_cannot_vouch_for(tmp_path):
    """NaN samples in float audio, a truncated JPEG and a clip shorter than the model's receptive field all pass a
    header check; training would crash on them (a NaN clip did, at step 5) or read them through their padding."""
    from c2f.presets import tiny_config

    _wav(tmp_path / "ok.wav"); _jpg(tmp_path / "ok.png")
    samples = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    samples[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", samples, 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "short.wav", samples[:200] * 0, 16000)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    rows = [dict(audio="ok.wav", image="ok.png", image_id=0), dict(audio="nan.wav", image="ok.png", image_id=0),
            dict(audio="short.wav", image="ok.png", image_id=0), dict(audio="ok.wav", image="cut.jpg", image_id=1)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    minimum = tiny_config().min_audio_samples
    with pytest.raises(ValueError, match=r"3 bad file\(s\)") as error:
        validate_records(load_manifest(tmp_path / "m.jsonl"), "mine", min_audio_samples=minimum)
    message = str(error.value)
    assert "nan.wav: holds NaN or infinite samples" in message
    assert f"short.wav: 200 samples at 16 kHz, shorter than the model's minimum of {minimum}" in message
    assert "cut.jpg: unreadable" in message
    validate_records(load_manifest(tmp_path / "m.jsonl").select([0]), "mine", min_audio_samples=minimum)  # the good row passes
