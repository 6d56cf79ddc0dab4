"""The speech-image-retrieval pipeline, in process and from a saved folder in a fresh process."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import pipeline

from c2f import TASK, save_for_pipeline


@pytest.fixture
def gallery(tmp_path):
    rng = np.random.default_rng(0)
    images, audios = [], []
    for number in range(5):
        path = tmp_path / f"image{number}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
        path = tmp_path / f"clip{number}.wav"
        soundfile.write(path, rng.standard_normal(4000 + 800 * number).astype(np.float32) * 0.1, 16000)
        audios.append(str(path))
    return images, audios


def _expected_coarse_order(model, processor, audio, images):
    with torch.no_grad():
        query = processor(audio=[audio])
        speech = model.get_speech_features(query["input_values"], query["attention_mask"])
        return (speech @ model.get_image_features(processor(images=images)["pixel_values"]).t())[0].argsort(descending=True).tolist()


def test_pipeline_ranks_images_for_a_spoken_query_both_ways(model, processor, gallery):
    model.eval()
    images, audios = gallery
    pipe = pipeline(TASK, model=model, processor=processor)
    coarse = pipe(audios[0], candidate_images=images, top_k=5, rerank_k=0)
    assert [r["index"] for r in coarse] == _expected_coarse_order(model, processor, audios[0], images)
    assert all("match_score" not in r for r in coarse) and coarse[0]["image"] in images
    fine = pipe(audios[0], candidate_images=images, top_k=3, rerank_k=2)
    assert len(fine) == 3 and all("match_score" in r for r in fine[:2]) and "match_score" not in fine[2]
    # The documented scores, by value: fine = SIM logit margin + cosine / temperature above the re-rank depth,
    # the cosine below it; the list is in fine order first.
    temperature = float(model.get_temperature().detach())
    for result in fine[:2]:
        margin = math.log(result["match_score"] / (1 - result["match_score"]))
        assert result["score"] == pytest.approx(margin + result["coarse_score"] / temperature, abs=1e-3)
    assert fine[0]["score"] >= fine[1]["score"] and fine[2]["score"] == fine[2]["coarse_score"]
    assert all(r["score"] == r["coarse_score"] for r in coarse) and abs(coarse[0]["score"]) <= 1
    assert {r["index"] for r in fine[:2]} == {r["index"] for r in coarse[:2]}  # re-rank reorders within the top-k
    reverse = pipe(images[1], candidate_audios=[{"array": soundfile.read(a)[0], "sampling_rate": 16000} for a in audios], top_k=2)
    assert len(reverse) == 2 and "audio" not in reverse[0]  # arrays have no path to report
    batched = pipe([audios[0], audios[1]], candidate_images=images, top_k=1)
    assert len(batched) == 2 and batched[0][0]["index"] == pipe(audios[0], candidate_images=images, top_k=1)[0]["index"]


def test_pipeline_errors_name_the_problem(model, processor, gallery):
    images, audios = gallery
    pipe = pipeline(TASK, model=model, processor=processor)
    with pytest.raises(ValueError, match="exactly one of candidate_images"):
        pipe(audios[0])
    with pytest.raises(ValueError, match="does not exist"):
        pipe("/missing/query.wav", candidate_images=images)


LOADER = r"""
import json, sys
from transformers import pipeline
folder, audio, images = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pipe = pipeline("speech-image-retrieval", model=folder, trust_remote_code=True)
assert not [name for name in sys.modules if name == "c2f" or name.startswith("c2f.")]
print(json.dumps(pipe(audio, candidate_images=images, top_k=5, rerank_k=3)))
"""


def test_pipeline_loads_from_a_saved_folder_in_a_fresh_process(tmp_path, model, processor, gallery):
    model.eval()
    images, audios = gallery
    folder = tmp_path / "saved"
    save_for_pipeline(model, processor, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_c2f.SpeechImageRetrievalPipeline"
    assert (folder / "pipeline_c2f.py").exists() and (folder / "processor_config.json").exists()
    expected = pipeline(TASK, model=model, processor=processor)(audios[2], candidate_images=images, top_k=5, rerank_k=3)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    (tmp_path / "cwd").mkdir()
    result = subprocess.run([sys.executable, "-c", LOADER, str(folder), audios[2], json.dumps(images)],
                            cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["index"] for r in loaded] == [r["index"] for r in expected]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(loaded, expected))
