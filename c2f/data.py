"""Speech-image datasets in one record shape: `audio` (path), `image` (path), `image_id` (int), `caption`,
`speaker`, `split`.

Loaders for the shipped demo, a local JSONL/CSV manifest, Flickr8k Audio Captions and SpokenCOCO in their release
layouts, and Hub datasets with `audio` / `image` / `image_id` columns. `validate_records` checks every file before
training starts, so a broken file fails in seconds with its name, not at step 3,000.
"""

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile
import torch
from datasets import Dataset
from PIL import Image
from tqdm.auto import tqdm

from .processing_c2f import C2FProcessor, load_audio

DEMO_ROOT = Path(__file__).resolve().parent / "demo_data"
RECORD_FIELDS = ("audio", "image", "image_id", "caption", "speaker", "split")


def _records_to_dataset(records: list[dict], source: str) -> Dataset:
    if not records:
        raise ValueError(f"{source}: the split is empty; expected at least one speech-image pair")
    columns = {field: [record.get(field, "") for record in records] for field in RECORD_FIELDS}
    columns["image_id"] = [int(value) for value in columns["image_id"]]
    return Dataset.from_dict(columns)


def _integer_ids(keys: Iterable[str]) -> dict[str, int]:
    """Stable integer ids for string image keys (file names), in sorted order."""
    return {key: number for number, key in enumerate(sorted(set(keys)))}


def first_row_of_each_image(dataset: Dataset) -> dict[int, int]:
    """`{image_id: first row showing it}`, in order of first appearance: one row per distinct image."""
    first_row = {}
    for row, image_id in enumerate(dataset["image_id"]):
        first_row.setdefault(int(image_id), row)
    return first_row


def load_manifest(path: str | os.PathLike, split: str | None = None) -> Dataset:
    """A JSONL or CSV manifest with `audio`, `image` and `image_id` (+ optional caption, speaker, split) per row.

    Relative paths are resolved against the manifest's folder. Non-integer image ids are mapped to integers.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist")
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write) would otherwise rename the first column.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"manifest {path} is not UTF-8 text ({error}); save it as UTF-8") from error
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"manifest {path} line {number}: not valid JSON ({error})") from error
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"manifest {path} line {number}: expected a JSON object, got {type(rows[-1]).__name__}")
    for number, row in enumerate(rows, start=1):
        missing = [field for field in ("audio", "image", "image_id") if row.get(field) in (None, "")]
        if missing:
            raise ValueError(f"manifest {path} row {number}: missing field(s) {missing}; expected audio, image, image_id")
        wrong = [field for field in ("audio", "image") if not isinstance(row[field], str)]
        if wrong:
            raise ValueError(f"manifest {path} row {number}: {wrong[0]} must be a path string, got {row[wrong[0]]!r}")
    if split is not None:
        unassigned = [number for number, row in enumerate(rows, start=1) if row.get("split") in (None, "")]
        if unassigned:
            # Such a row would join every split: train and test would overlap without a word.
            raise ValueError(
                f"manifest {path}: {len(unassigned)} row(s) have no 'split' (first: row {unassigned[0]}); asked for "
                f"split {split!r}, every row needs one (e.g. train, validation, test)"
            )
        rows = [row for row in rows if row["split"] == split]
    if rows and not all(str(row["image_id"]).lstrip("-").isdigit() for row in rows):
        mapping = _integer_ids(str(row["image_id"]) for row in rows)
        rows = [{**row, "image_id": mapping[str(row["image_id"])]} for row in rows]
    records = [
        {**row, "audio": str(path.parent / row["audio"]), "image": str(path.parent / row["image"]), "split": row.get("split", split or "")}
        for row in rows
    ]
    return _records_to_dataset(records, f"manifest {path} split {split!r}")


def load_demo(split: str, domain: str = "demo") -> Dataset:
    """The demo dataset shipped inside c2f (`domain` "demo" or "demo-shifted")."""
    manifest = DEMO_ROOT / domain / "metadata.jsonl"
    if not manifest.is_file():
        raise ValueError(f"the demo dataset is missing at {manifest}; regenerate it with `python -m c2f.demo`")
    return load_manifest(manifest, split)


_FLICKR_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "validation": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def load_flickr8k(data_dir: str | os.PathLike, split: str) -> Dataset:
    """Flickr8k Audio Captions: `flickr_audio/wav2capt.txt`, `flickr_audio/wavs/`, `Flicker8k_Dataset/` and the
    `Flickr_8k.{train,dev,test}Images.txt` split lists, all under `data_dir` (split lists may also sit in a
    `Flickr8k_text/` sub-folder, as in the text release)."""
    root = Path(data_dir)
    split_name = _FLICKR_SPLIT_FILES.get(split)
    if split_name is None:
        raise ValueError(f"flickr8k split must be one of {list(_FLICKR_SPLIT_FILES)}, got {split!r}")
    split_file = next((p for p in (root / split_name, root / "Flickr8k_text" / split_name) if p.is_file()), None)
    captions_file = root / "flickr_audio" / "wav2capt.txt"
    for required in (split_file or root / split_name, captions_file):
        if not required.is_file():
            raise ValueError(f"flickr8k: {required} not found; expected the Flickr8k Audio Captions release layout")
    images = {line.strip() for line in split_file.read_text().splitlines() if line.strip()}
    ids = _integer_ids(images)
    records = []
    for number, line in enumerate(captions_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"flickr8k: {captions_file} line {number}: expected '<wav> <image>.jpg #<n>'")
        wav, image = parts[0], parts[1]
        if image in images:
            speaker = wav.split("_")[0]
            records.append(dict(audio=str(root / "flickr_audio" / "wavs" / wav), image=str(root / "Flicker8k_Dataset" / image),
                                image_id=ids[image], caption="", speaker=speaker, split=split))
    return _records_to_dataset(records, f"flickr8k {split}")


_COCO_SPLIT_FILES = {"train": "SpokenCOCO_train.json", "validation": "SpokenCOCO_val.json", "test": "SpokenCOCO_val.json"}


def load_spokencoco(data_dir: str | os.PathLike, split: str) -> Dataset:
    """SpokenCOCO: `SpokenCOCO/SpokenCOCO_{train,val}.json` (or the JSON files directly in `data_dir`), wavs under
    `SpokenCOCO/`, images under `data_dir` (`train2014/`, `val2014/`)."""
    root = Path(data_dir)
    if split not in _COCO_SPLIT_FILES:
        raise ValueError(f"spokencoco split must be one of {list(_COCO_SPLIT_FILES)}, got {split!r}")
    name = _COCO_SPLIT_FILES[split]
    json_path = next((p for p in (root / "SpokenCOCO" / name, root / name) if p.is_file()), None)
    if json_path is None:
        raise ValueError(f"spokencoco: {root / 'SpokenCOCO' / name} not found; expected the SpokenCOCO release layout")
    try:
        entries = json.loads(json_path.read_text())["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"spokencoco: {json_path} is not a SpokenCOCO file with a 'data' list ({error})") from error
    ids = _integer_ids(entry["image"] for entry in entries)
    records = []
    for entry in entries:
        for caption in entry.get("captions", []):
            records.append(dict(audio=str(json_path.parent / caption["wav"]), image=str(root / entry["image"]),
                                image_id=ids[entry["image"]], caption=caption.get("text", ""),
                                speaker=caption.get("speaker", ""), split=split))
    return _records_to_dataset(records, f"spokencoco {split}")


def load_hub_dataset(name_or_path: str, split: str, **kwargs) -> Dataset:
    """A `datasets` dataset with `audio`, `image` and `image_id` columns. Audio is kept undecoded (paths/bytes), so
    no torchcodec is needed; soundfile decodes it in the collator."""
    from datasets import Audio, load_dataset, load_from_disk

    if Path(name_or_path).is_dir() and (Path(name_or_path) / "dataset_dict.json").exists():
        dataset = load_from_disk(name_or_path)[split]
    else:
        dataset = load_dataset(name_or_path, split=split, **kwargs)
    missing = [column for column in ("audio", "image", "image_id") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset {name_or_path} split {split}: missing column(s) {missing}")
    if isinstance(dataset.features["audio"], Audio):
        dataset = dataset.cast_column("audio", Audio(decode=False))
    if len(dataset) == 0:
        raise ValueError(f"dataset {name_or_path} split {split}: the split is empty")
    return dataset


def load_speech_image_dataset(name: str, split: str, data_dir: str | None = None) -> Dataset:
    """Dispatch on a dataset name: demo, demo-shifted, flickr8k, spokencoco, manifest (data_dir = the file), or a
    Hub dataset name / saved dataset folder."""
    if name in ("demo", "demo-shifted"):
        return load_demo(split, name)
    if name in ("flickr8k", "spokencoco"):
        if data_dir is None:
            raise ValueError(f"--dataset {name} needs --data_dir pointing at the release folder")
        return (load_flickr8k if name == "flickr8k" else load_spokencoco)(data_dir, split)
    if name == "manifest":
        if data_dir is None:
            raise ValueError("--dataset manifest needs --data_dir pointing at a .jsonl or .csv file")
        return load_manifest(data_dir, split)
    return load_hub_dataset(name, split)


def _file_of(value, kind: str) -> tuple[str | None, str | None]:
    """(path to check, problem). In-memory values (bytes, PIL images) have no file to check."""
    if isinstance(value, Image.Image) or (isinstance(value, dict) and value.get("bytes") is not None):
        return None, None
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, (str, os.PathLike)) or not os.path.isfile(value):
        return None, f"{kind} {value}: missing"
    return value, None


def _check_audio(value, min_samples: int = 1) -> str | None:
    """A problem with one audio file, or None. Lengths come from the header; the samples are decoded only where the
    format can hold NaN or infinity (float PCM), which would crash training steps later."""
    path, problem = _file_of(value, "audio")
    if path is None:
        return problem
    try:
        info = soundfile.info(path)
        samples = int(info.frames * 16000 / info.samplerate) if info.samplerate else 0
        if info.frames == 0:
            return f"audio {path}: empty"
        if samples < min_samples:
            return f"audio {path}: {samples} samples at 16 kHz, shorter than the model's minimum of {min_samples}"
        if info.subtype in ("FLOAT", "DOUBLE") and not np.isfinite(soundfile.read(path, dtype="float32")[0]).all():
            return f"audio {path}: holds NaN or infinite samples"
    except Exception as error:  # soundfile raises several types
        return f"audio {path}: unreadable ({error})"
    return None


def _check_image(value) -> str | None:
    """A problem with one image file, or None. The image is decoded (JPEGs at 1/8 scale, which still reads every
    byte): `verify` alone passes truncated files."""
    path, problem = _file_of(value, "image")
    if path is None:
        return problem
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image.width // 8 or 1, image.height // 8 or 1))
            image.load()
    except Exception as error:  # PIL raises several types
        return f"image {path}: unreadable ({error})"
    return None


def audio_frames(value) -> int:
    """Length of one clip in samples at its own rate, read from the file header where there is a file."""
    if isinstance(value, dict) and value.get("array") is not None:
        return len(value["array"])
    if isinstance(value, dict) and value.get("bytes") is not None:
        return soundfile.info(io.BytesIO(value["bytes"])).frames
    path = value.get("path") if isinstance(value, dict) else value
    try:
        return soundfile.info(path).frames
    except Exception as error:  # soundfile raises several types
        raise ValueError(f"audio {path}: unreadable ({error})") from error


def with_audio_lengths(dataset: Dataset, column: str = "length") -> Dataset:
    """Adds each clip's length, for `--train_sampling_strategy group_by_length`: batches of similar lengths carry
    less padding (on the demo a random batch of 32 pads its clips to 1.8x their mean length)."""
    if column in dataset.column_names:
        return dataset
    return dataset.add_column(column, [audio_frames(audio) for audio in dataset["audio"]])


def with_mirror_axes(dataset: Dataset, name: str) -> Dataset:
    """The dataset with its `mirror_axis` column (which mirror of each image its caption contradicts), for the trainer's
    mirror negatives: kept when the data has one, derived from the captions for the demo, whose grammar c2f owns."""
    if "mirror_axis" in dataset.column_names:
        return dataset
    if name != "demo":
        raise ValueError(f"--mirror_negatives needs a `mirror_axis` column in the {name} training set (per record: 1 if "
                         "a left-right mirror of the image contradicts its caption, 2 if an up-down one does, 0 if "
                         "neither); only the demo's is derived from its captions. Or train without --mirror_negatives")
    from .demo.scenes import mirror_axis

    return dataset.add_column("mirror_axis", [mirror_axis(caption) for caption in dataset["caption"]])


def validate_records(dataset: Dataset, name: str, show: int = 5, min_audio_samples: int = 1) -> None:
    """Check every audio and image file once (decoding what must be decoded; clips of fewer than `min_audio_samples`
    at 16 kHz count as bad); raise one error listing the first offenders and their count."""
    if len(dataset) == 0:
        raise ValueError(f"{name}: the split is empty")
    problems = []
    seen_images = set()
    pairs = zip(dataset["audio"], dataset["image"])
    for audio, image in tqdm(pairs, total=len(dataset), desc=f"checking the files of {name}", leave=False):
        problem = _check_audio(audio, min_audio_samples)
        if problem:
            problems.append(problem)
        key = image if isinstance(image, str) else None
        if key is None or key not in seen_images:
            problem = _check_image(image)
            if problem:
                problems.append(problem)
            if key is not None:
                seen_images.add(key)
    if problems:
        listed = "\n  ".join(problems[:show])
        raise ValueError(f"{name}: {len(problems)} bad file(s), first {min(show, len(problems))}:\n  {listed}")


class SpeechImageCollator:
    """Runs the processor on a list of records: decodes and pads audio, preprocesses images, keeps image ids.

    With `image_features` (an `ImageFeatureCache` of a frozen tower) images are not decoded at all: the batch carries
    `image_hidden_states` instead of `pixel_values`; likewise `speech_features` (a `SpeechFeatureCache` of a frozen
    HuBERT) gives `speech_hidden_states` + `speech_frame_mask` instead of `input_values`. With `augmentation` (a
    `SpeechAugmentation`) each clip is perturbed after decoding, and with `image_augmentation` (an
    `ImageAugmentation`) each training image is shifted. A `mirror_axis` column (see `c2f.demo.scenes.mirror_axis`)
    reaches the batch as `mirror_axes`. `decoded_cache_bytes` keeps decoded waveforms (and
    preprocessed images) in memory up to that size, so later epochs skip decoding: decoding Opus in the collator cost
    about 40% of a demo training step.
    """

    def __init__(self, processor: C2FProcessor, max_audio_seconds: float | None = 15.0, image_features=None,
                 augmentation=None, decoded_cache_bytes: int = 0, speech_features=None, image_augmentation=None):
        if speech_features is not None and augmentation is not None:
            raise ValueError("a HuBERT feature cache holds the clips as recorded; with voice augmentation every epoch "
                             "hears them changed: turn one off (--augment_speech false or --speech_feature_cache false)")
        self.speech_features = speech_features
        self.processor = processor
        self.max_length = int(max_audio_seconds * processor.sampling_rate) if max_audio_seconds else None
        self.image_features = image_features
        self.augmentation = augmentation
        if image_features is not None and image_augmentation is not None:
            raise ValueError("an image feature cache holds each image's features once; shifted images need the tower "
                             "to run: turn one off (image_shift 0 or --image_feature_cache false)")
        self.image_augmentation = image_augmentation
        self.decoded_cache_bytes = decoded_cache_bytes
        self._decoded: dict[str, np.ndarray] = {}
        self._decoded_bytes = 0

    def _remember(self, key: str | None, value):
        size = value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()
        if key is not None and self._decoded_bytes + size <= self.decoded_cache_bytes:
            self._decoded[key] = value
            self._decoded_bytes += size
        return value

    def _waveform(self, audio, index: int) -> np.ndarray:
        key = media_cache_key(audio)
        if key is not None and key in self._decoded:
            return self._decoded[key]
        return self._remember(key, load_audio(audio, self.processor.sampling_rate, index=index))

    def _pixels(self, images: list) -> torch.Tensor:
        """Preprocessed images, remembered by path like the audio (augmented after, in `__call__`)."""
        keys = [media_cache_key(image, "image:") for image in images]
        missing = [index for index, key in enumerate(keys) if key is None or key not in self._decoded]
        fresh = self.processor(images=[images[index] for index in missing])["pixel_values"] if missing else None
        rows = {index: self._remember(keys[index], fresh[position]) for position, index in enumerate(missing)}
        return torch.stack([rows[index] if index in rows else self._decoded[keys[index]] for index in range(len(images))])

    def _speech_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        if self.speech_features is not None:  # frozen HuBERT: its cached frames, padded, and which frames are real
            frames = [self.speech_features[record["audio"]] for record in records]
            padded = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
            mask = torch.arange(padded.shape[1]).view(1, -1) < torch.tensor([len(f) for f in frames]).view(-1, 1)
            return {"speech_hidden_states": padded, "speech_frame_mask": mask}
        waveforms = [self._waveform(record["audio"], index) for index, record in enumerate(records)]
        if self.augmentation is not None:
            waveforms = self.augmentation.augment_batch(waveforms, self.processor.sampling_rate)
        return dict(self.processor(audio=waveforms, sampling_rate=self.processor.sampling_rate, max_length=self.max_length))

    def image_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """The image side of a batch alone: `pixel_values`, or a frozen tower's cached `image_hidden_states`."""
        if self.image_features is not None:
            return {"image_hidden_states": torch.stack([self.image_features[int(record["image_id"])] for record in records])}
        return {"pixel_values": self._pixels([record["image"] for record in records])}

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._speech_batch(records)
        batch.update(self.image_batch(records))
        if self.image_augmentation is not None and "pixel_values" in batch:
            batch["pixel_values"] = self.image_augmentation.augment_batch(batch["pixel_values"])
        batch["image_ids"] = torch.tensor([int(record["image_id"]) for record in records])
        if "mirror_axis" in records[0]:  # for the trainer's mirror negatives
            batch["mirror_axes"] = torch.tensor([int(record["mirror_axis"]) for record in records])
        return batch


def media_cache_key(item, prefix: str = "audio:") -> str | None:
    """The file path a decoded medium is remembered by (after `prefix`); None for in-memory items, which have no
    file to name them. The collator's decoded cache and the HuBERT feature cache both key clips this way."""
    if isinstance(item, (str, os.PathLike)):
        return prefix + os.fspath(item)
    if isinstance(item, dict) and item.get("bytes") is None and item.get("array") is None and item.get("path"):
        return prefix + os.fspath(item["path"])
    return None
