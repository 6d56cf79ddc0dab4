"""run_retrieval.py end to end on the shipped demo data (a few steps), including the Hub upload with only the
network calls replaced."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("run_retrieval", ROOT / "run_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_retrieval"] = module  # Trainer pickles the arguments dataclass by module name
    spec.loader.exec_module(module)
    return module


def test_train_evaluate_save_and_push(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id

    def fake_upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        calls["upload_folder"] = repo_id
        shutil.copytree(folder_path, hub / repo_id, ignore=shutil.ignore_patterns(*ignore_patterns))

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    out = tmp_path / "run"
    results = _load_script().main([
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8", "--queue_size", "16",
        "--test_split", "validation", "--freeze_image_backbone", "true", "--zero_shot_dataset", "demo-shifted",
        "--push_to_hub", "--hub_model_id", "someone/c2f-tiny", "--logging_steps", "1",
    ])
    assert set(results) == {"demo validation", "demo validation_unseen_voices", "demo-shifted test (zero-shot)"}
    for metrics in results.values():
        assert 0 <= metrics["s2i_R@1"] <= metrics["s2i_R@5"] <= metrics["s2i_R@10"] <= 100
        assert "reranked_i2s_R@10" in metrics
    assert json.loads((out / "retrieval_results.json").read_text()) == results
    assert list((out / "image_features").glob("image_features-demo-train-*.safetensors"))  # frozen tower: cached

    uploaded = hub / "someone" / "c2f-tiny"
    assert calls == {"create_repo": "someone/c2f-tiny", "upload_folder": "someone/c2f-tiny"}
    names = {path.name for path in uploaded.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "configuration_c2f.py", "modeling_c2f.py",
            "processing_c2f.py", "pipeline_c2f.py", "README.md"} <= names
    assert "image_features" not in names and "training_args.bin" not in names  # no pickles on the Hub
    card = (uploaded / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert "speech-image-retrieval" in metadata["tags"] and metadata["license"] == "apache-2.0"
    index = metadata["model-index"][0]["results"]
    reported = {(r["dataset"]["name"], r["dataset"]["split"], r["metrics"][0]["name"]): r["metrics"][0]["value"]
                for r in index}
    expected = round(results["demo validation"]["reranked_s2i_R@1"], 2)
    assert reported[("demo", "validation", "speech→image R@1")] == expected
    assert "Reconstruction notes" in card and "someone/c2f-tiny" in card


def test_one_seed_gives_one_model(tmp_path, one_thread):
    """--seed fixes the initialisation, the augmentation draws and the sampling: two runs end with equal weights."""
    from safetensors.torch import load_file

    script = _load_script()
    common = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--queue_size", "16",
              "--test_split", "validation", "--report_splits", "", "--k_test", "0", "--skip_file_check", "true"]
    weights = []
    for run, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        script.main(["--output_dir", str(tmp_path / run), "--seed", seed, *common])
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
