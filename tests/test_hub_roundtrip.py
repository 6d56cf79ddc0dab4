"""save_pretrained -> AutoModel/AutoProcessor in a fresh process that has never imported c2f."""

import json
import os
import subprocess
import sys

import numpy as np
import torch

LOADER = r"""
import sys, numpy as np, torch
from transformers import AutoModel, AutoProcessor
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
leaked = [name for name in sys.modules if name == "c2f" or name.startswith("c2f.")]
assert not leaked, f"the installed c2f package was imported: {leaked}"
inputs = np.load(folder + "/inputs.npz")
batch = processor(audio=[inputs["wav0"], inputs["wav1"]], images=[inputs["img0"], inputs["img1"]], sampling_rate=16000)
with torch.no_grad():
    speech = model.get_speech_features(batch["input_values"], batch["attention_mask"])
    images = model.get_image_features(batch["pixel_values"])
    scores = model.match_scores(batch["input_values"], batch["pixel_values"], batch["attention_mask"])
torch.save({"speech": speech, "images": images, "scores": scores, "class": type(model).__module__}, folder + "/loaded.pt")
"""


def test_fresh_process_auto_classes_give_bit_identical_embeddings(tmp_path, model, processor):
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "configuration_c2f.py", "modeling_c2f.py", "processing_c2f.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_c2f.C2FSpeechImageModel"

    rng = np.random.default_rng(1)
    inputs = {"wav0": rng.standard_normal(16000).astype(np.float32), "wav1": rng.standard_normal(9000).astype(np.float32),
              "img0": rng.integers(0, 255, (50, 40, 3), dtype=np.uint8), "img1": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    batch = processor(audio=[inputs["wav0"], inputs["wav1"]], images=[inputs["img0"], inputs["img1"]], sampling_rate=16000)
    with torch.no_grad():
        speech = model.get_speech_features(batch["input_values"], batch["attention_mask"])
        images = model.get_image_features(batch["pixel_values"])
        scores = model.match_scores(batch["input_values"], batch["pixel_values"], batch["attention_mask"])

    # Run from an empty directory with no PYTHONPATH, so `import c2f` could only come from the saved code.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    empty = tmp_path / "cwd"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path)], cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    assert loaded["class"].startswith("transformers_modules")
    assert torch.equal(loaded["speech"], speech)
    assert torch.equal(loaded["images"], images)
    assert torch.equal(loaded["scores"], scores)
