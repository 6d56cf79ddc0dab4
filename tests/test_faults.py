"""c2f's own fault and bad-input suite: what an index, a checkpoint and the inputs promise under crashes, concurrent
writers and careless or hostile files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import c2f.retrieval
from c2f import C2FSpeechImageModel, save_for_pipeline
from c2f.cli import index_main, search_main
from c2f.retrieval import SpeechImageIndex, index_lock


def _images(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        path = folder / f"img{seed}-{number:02d}.png"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def built(tmp_path, model, processor):
    model.eval()
    index = SpeechImageIndex.build(model, processor, _images(tmp_path / "images", 6), "image", progress=False)
    index.save(tmp_path / "index")
    return index


@pytest.mark.parametrize("crash_at", ["save_file", "copymode", "replace", "unlink"])
def test_a_crash_at_any_step_of_a_save_leaves_an_index_that_loads(tmp_path, built, model, processor, monkeypatch, crash_at):
    before = SpeechImageIndex.load(tmp_path / "index")
    after = SpeechImageIndex.load(tmp_path / "index")
    after.add(model, processor, _images(tmp_path / "more", 2, seed=1))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt(f"killed at {crash_at}")

    target = {"save_file": (c2f.retrieval, "save_file"), "copymode": (c2f.retrieval.shutil, "copymode"),
              "replace": (c2f.retrieval.os, "replace"), "unlink": (type(tmp_path), "unlink")}[crash_at]
    monkeypatch.setattr(*target, crash)
    with pytest.raises(KeyboardInterrupt):
        after.save(tmp_path / "index")
    monkeypatch.undo()
    loaded = SpeechImageIndex.load(tmp_path / "index")
    # Before the commit point the old index, from it on the new one; never a mix.
    expected = after if crash_at == "unlink" else before
    assert loaded.records == expected.records and torch.equal(loaded.embeddings, expected.embeddings)


KILL_DURING_SAVE = """
import os, pathlib, shutil, signal, sys
import c2f.retrieval
from c2f.retrieval import SpeechImageIndex

folder, step = pathlib.Path(sys.argv[1]), sys.argv[2]
index = SpeechImageIndex.load(folder)
index.remove([index.records[0]["id"]])
kill = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: a real kill
target = {"save_file": (c2f.retrieval, "save_file"), "copymode": (shutil, "copymode"),
          "replace": (c2f.retrieval.os, "replace"), "unlink": (pathlib.Path, "unlink")}[step]
setattr(*target, kill)
index.save(folder)
"""


@pytest.mark.parametrize("step", ["save_file", "copymode", "replace", "unlink"])
def test_a_process_killed_at_any_step_of_a_save_leaves_an_index_that_loads(tmp_path, built, step):
    before = SpeechImageIndex.load(tmp_path / "index")
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path / "index"), step], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    loaded = SpeechImageIndex.load(tmp_path / "index")
    # Killed before the commit point: the old index; at the clean-up after it: the new one (the first item removed).
    expected = before.records[1:] if step == "unlink" else before.records
    assert loaded.records == expected and len(loaded.embeddings) == len(expected)


def test_concurrent_writers_lose_nothing(tmp_path, model, processor):
    model.eval()
    save_for_pipeline(model, processor, tmp_path / "model")
    _images(tmp_path / "images", 4)
    assert index_main(["build", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"),
                       "--out", str(tmp_path / "index")]) == 0
    new = _images(tmp_path / "new", 3, seed=2)
    # Separate processes, as two shells would run them (forking a process that has run torch can deadlock).
    script = "import sys; from c2f.cli import index_main; sys.exit(index_main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", script, "add", "--index", str(tmp_path / "index"), image], env=env)
               for image in new]
    assert [writer.wait(timeout=300) for writer in writers] == [0] * len(new)
    index = SpeechImageIndex.load(tmp_path / "index")
    assert len(index) == 7 and {r["path"] for r in index.records} >= set(new)
    assert len([f for f in os.listdir(tmp_path / "index") if f.startswith("embeddings-")]) == 1  # no leftovers


def test_an_index_searched_from_another_folder_reads_the_same_files(tmp_path, model, processor, monkeypatch):
    model.eval()
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "photos", 3)
    index = SpeechImageIndex.build(model, processor, "photos", "image", progress=False)
    assert all(os.path.isabs(r["path"]) for r in index.records)
    index.save("index")
    (tmp_path / "elsewhere" / "photos").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")  # holds a "photos" folder of its own, empty
    loaded = SpeechImageIndex.load(tmp_path / "index")
    assert all(path.startswith(str(tmp_path / "photos")) for path in (r["path"] for r in loaded.records))


def test_opening_an_index_runs_no_code_from_its_model_folder(tmp_path, model, processor, capsys):
    model.eval()
    save_for_pipeline(model, processor, tmp_path / "model")
    marker = tmp_path / "payload-ran"
    for name in ("processing_c2f.py", "modeling_c2f.py", "configuration_c2f.py"):
        path = tmp_path / "model" / name
        path.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + path.read_text())
    _images(tmp_path / "images", 3)
    assert index_main(["build", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"),
                       "--out", str(tmp_path / "index")]) == 0
    query = tmp_path / "q.wav"
    import soundfile

    soundfile.write(query, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    assert search_main(["--index", str(tmp_path / "index"), str(query), "--top-k", "2"]) == 0
    assert not marker.exists()
    # A model path that is not a local folder (e.g. a Hub id planted in index.json) is refused, not fetched.
    metadata = json.loads((tmp_path / "index" / "index.json").read_text())
    metadata["model_path"] = "someone/evil-model"
    (tmp_path / "index" / "index.json").write_text(json.dumps(metadata))
    assert search_main(["--index", str(tmp_path / "index"), str(query)]) == 2
    assert "someone/evil-model is not a local folder" in capsys.readouterr().err


def test_index_lock_is_exclusive(tmp_path):
    script = ("import sys, time; from c2f.retrieval import index_lock\n"
              "with index_lock(sys.argv[1]): print('got it', flush=True)")
    with index_lock(tmp_path / "index"):
        waiter = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "index")], stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=3)  # blocked while we hold the lock
    assert waiter.wait(timeout=60) == 0 and waiter.stdout.read() == "got it\n"


def test_feature_cache_is_rebuilt_when_the_images_behind_the_ids_change(tmp_path, model, processor):
    from datasets import Dataset

    from c2f.training.feature_cache import ImageFeatureCache

    paths = _images(tmp_path / "images", 3)
    rows = lambda files: Dataset.from_dict({"image": files, "image_id": list(range(len(files))), "audio": files})
    first = ImageFeatureCache.build(model.vision_model, processor, rows(paths), tmp_path / "cache")
    # The dataset loses its first image: ids 0 and 1 now stand for other files.
    second = ImageFeatureCache.build(model.vision_model, processor, rows(paths[1:]), tmp_path / "cache")
    assert second.path != first.path
    with torch.no_grad():
        expected = model.vision_model(pixel_values=processor(images=[paths[1]])["pixel_values"]).last_hidden_state[0]
    assert torch.allclose(second[0], expected, atol=1e-5)
    again = ImageFeatureCache.build(model.vision_model, processor, rows(paths[1:]), tmp_path / "cache")
    assert again.path == second.path  # unchanged files: reused


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bom.csv", "\ufeffaudio,image,image_id,split\na.wav,x.png,1,test\n", None),
        ("latin1.csv", "audio,image,image_id,caption\na.wav,x.png,1,caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
        ("list.jsonl", '["a.wav", "x.png", 1]\n', "line 1: expected a JSON object, got list"),
        ("number.jsonl", '{"audio": 5, "image": "x.png", "image_id": 1}\n', "row 1: audio must be a path string, got 5"),
    ],
)
def test_manifest_mistakes_get_a_clear_error(tmp_path, name, content, message):
    from c2f.data import load_manifest

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    if message is None:  # a byte-order mark is no mistake
        assert load_manifest(path, split="test")["image_id"] == [1]
    else:
        with pytest.raises(ValueError, match=message):
            load_manifest(path, split="test")


def test_search_arguments_and_rates_are_checked(tmp_path, built, model, processor):
    index = SpeechImageIndex.load(tmp_path / "index")
    clip = np.zeros(16000, dtype=np.float32)
    for bad in (dict(top_k=-1), dict(top_k=0), dict(rerank_k=-2)):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1 and rerank_k >= 0"):
            index.search(model, processor, clip, **bad)
    with pytest.raises(ValueError, match="sampling_rate must be a positive number of Hz, got 0"):
        processor(audio=[clip], sampling_rate=0)
    with pytest.raises(ValueError, match="'sampling_rate' must be a positive number of Hz"):
        processor(audio=[{"array": clip, "sampling_rate": 0}])


def test_record_fields_do_not_hide_the_ranking(tmp_path, built, model, processor):
    index = SpeechImageIndex.load(tmp_path / "index")
    index.records = [{**record, "score": "from the record", "index": -5} for record in index.records]
    results = index.search(model, processor, np.random.default_rng(0).standard_normal(16000).astype(np.float32), top_k=3)[0]
    assert all(isinstance(result["score"], float) and result["index"] >= 0 for result in results)


def test_folders_named_like_images_are_not_listed(tmp_path):
    from c2f.retrieval import list_media

    _images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "holiday.png").mkdir()
    assert all(os.path.isfile(path) for path in list_media(tmp_path / "photos", "image"))
    assert len(list_media(tmp_path / "photos", "image")) == 2


def test_search_cli_faults_end_in_one_clear_line(tmp_path, model, processor, capsys):
    """A cut embeddings file, a gallery file that vanished, a picture into a new folder, and non-finite scores: an exit
    status and a message naming the file, never a traceback, never a silent answer."""
    import soundfile

    model.eval()
    save_for_pipeline(model, processor, tmp_path / "model")
    _images(tmp_path / "images", 4)
    assert index_main(["build", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"),
                       "--out", str(tmp_path / "index")]) == 0
    query = tmp_path / "q.wav"
    soundfile.write(query, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    base = ["--index", str(tmp_path / "index"), str(query)]
    # A picture into a folder that does not exist yet: the folder is made.
    assert search_main(base + ["--png", str(tmp_path / "new" / "out.png"), "--top-k", "2"]) == 0
    assert (tmp_path / "new" / "out.png").is_file()
    # A gallery file deleted after indexing: named, exit 2 (re-ranking and the picture both re-read it).
    missing = sorted((tmp_path / "images").iterdir())[0]
    missing.unlink()
    capsys.readouterr()
    assert search_main(base + ["--top-k", "4", "--png", str(tmp_path / "out.png")]) == 2
    assert missing.name in capsys.readouterr().err
    # Non-finite scores (weights broken where the index's fingerprint does not look) are refused, not ranked.
    broken = C2FSpeechImageModel.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        broken.speech_encoder.input_projection.weight.fill_(float("nan"))
    save_for_pipeline(broken, processor, tmp_path / "broken")
    capsys.readouterr()
    assert search_main(base + ["--model", str(tmp_path / "broken"), "--rerank-k", "0"]) == 2
    assert "non-finite scores" in capsys.readouterr().err
    # An embeddings file cut short: a ValueError naming it.
    embeddings = next((tmp_path / "index").glob("embeddings-*.safetensors"))
    embeddings.write_bytes(embeddings.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{embeddings.name} is not a readable safetensors file"):
        SpeechImageIndex.load(tmp_path / "index")
