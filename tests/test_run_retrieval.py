"""run_retrieval.py end to end on the shipped demo data (a few steps), including the Hub upload with only the
network calls replaced."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, not transformers' 0600
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 2 and {"loss_sic", "loss_sim", "temperature", "alpha", "queue_fill"} <= set(logged[0])
    from PIL import Image

    with Image.open(out / "training_curves.png") as curves:  # losses, temperature, alpha, queue fill + the R@k table
        assert curves.width > 4 * curves.height / 2

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
    assert "negatives are sampled from the SIC similarities over the batch." in card  # no SIM image queue in this run
    # The card tells what ran: 2 steps end long before the queue and distillation would join (epoch 16).
    assert metadata["pipeline_tag"] == "feature-extraction" and "datasets" not in metadata  # demo: no Hub dataset id
    assert "2 optimizer steps" in card and "but the run ended at step 2, so it never ran" in card
    assert "queue of 16 momentum embeddings" not in card and "**Momentum distillation**" not in card
    assert "| learning_rate | 0.002 |" in card and "transformers " + __import__("transformers").__version__ in card


@pytest.mark.parametrize("distill_temperature, said", [(None, "softmaxed at\n  the online temperature"),
                                                       (0.03, "softmaxed at\n  a fixed temperature of 0.03")])
def test_the_card_says_at_what_temperature_the_soft_targets_were_made(tmp_path, distill_temperature, said):
    from c2f.hub import build_model_card, training_summary
    from c2f.presets import tiny_config
    from c2f.training import C2FTrainingArguments

    args = C2FTrainingArguments(output_dir=str(tmp_path), distill_temperature=distill_temperature, report_to="none")
    training = training_summary(args, global_step=10, momentum_start_step=2)  # distillation joined at step 2
    card = str(build_model_card(ROOT / "c2f" / "model_card.md", "someone/c2f-tiny", tiny_config(), {}, training, ""))
    assert "**Momentum distillation**" in card and said in card
    assert "over each clip as heard and played at 0.9, 1.1 times the speed; each image as it is and moved 0.03" in card
    one_view = tiny_config(test_time_speeds=(), test_time_image_shift=0.0)
    assert "Test-time views" not in str(build_model_card(ROOT / "c2f" / "model_card.md", "someone/c2f-tiny", one_view, {}, training, ""))


def test_one_seed_gives_one_model(tmp_path, one_thread):
    """--seed fixes the initialisation, the augmentation draws and the sampling: two runs end with equal weights.
    --data_seed moves the draws alone."""
    from safetensors.torch import load_file

    script = _load_script()
    common = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--queue_size", "16",
              "--test_split", "validation", "--report_splits", "", "--k_test", "0", "--skip_file_check", "true"]
    weights = []
    for run, seeds in (("a", ["--seed", "5"]), ("b", ["--seed", "5"]), ("c", ["--seed", "6"]),
                       ("d", ["--seed", "5", "--data_seed", "9"])):
        script.main(["--output_dir", str(tmp_path / run), *seeds, *common])
        # 3 steps log no loss (logging every 20): the run still ends well, with a curves picture that says so.
        assert (tmp_path / run / "training_curves.png").is_file()
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[3][name]) for name in weights[0])  # other batches and draws


def test_test_time_views_are_set_from_the_command_line_on_a_loaded_model(tmp_path):
    """Evaluating a saved model with other test-time views: the flags reach its config, which the pipeline and the
    index read too."""
    from c2f.modeling_c2f import C2FSpeechImageModel
    from c2f.presets import tiny_config, tiny_processor

    script = _load_script()
    C2FSpeechImageModel(tiny_config()).save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    model, _ = script.build_model_and_processor(script.ModelArguments(
        model_name_or_path=str(tmp_path), test_time_speeds=[1.05], test_time_image_shift=0.0))
    assert list(model.config.test_time_speeds) == [1.05] and model.config.test_time_image_shift == 0.0
    assert model.eval().image_views(torch.rand(1, 3, 64, 64)) == []


def test_config_overrides_change_the_tiny_model_and_are_checked():
    """`--config_overrides` as in the transformers examples: names must exist, values are cast and the whole config is
    checked again; a loaded model keeps its own config."""
    script = _load_script()
    model, _ = script.build_model_and_processor(script.ModelArguments(config_overrides="log_mel_cepstral_coefficients=13,embed_dim=32"))
    assert model.config.log_mel_cepstral_coefficients == 13 and model.speech_projection.out_features == 32
    assert model.speech_model.feature_extractor._cepstral_smoothing is not None
    with pytest.raises(ValueError, match="no_such_setting"):
        script.build_model_and_processor(script.ModelArguments(config_overrides="no_such_setting=1"))
    with pytest.raises(ValueError, match="log_mel_cepstral_coefficients"):
        script.build_model_and_processor(script.ModelArguments(config_overrides="log_mel_cepstral_coefficients=99"))
    with pytest.raises(ValueError, match="keeps its config"):
        script.build_model_and_processor(script.ModelArguments(model_name_or_path="anything", config_overrides="embed_dim=8"))


def test_an_eval_strategy_still_trains_and_evaluation_only_is_explicit(tmp_path):
    """transformers turns do_eval on for any eval strategy; that once skipped training silently."""
    script = _load_script()
    common = ["--per_device_train_batch_size", "8", "--test_split", "validation", "--report_splits", "",
              "--skip_file_check", "true"]
    trained = tmp_path / "trained"
    script.main(["--output_dir", str(trained), "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1",
                 "--use_queue", "false", "--use_distillation", "false", "--use_sim", "false", *common])
    state = json.loads((trained / "trainer_state.json").read_text())
    assert (trained / "model.safetensors").is_file() and state["global_step"] == 2
    assert any("eval_s2i_R@1" in entry for entry in state["log_history"])  # evaluated during training, too
    # Without SIM training the head is random: nothing re-ranks with it, in this run or where the model goes.
    assert not any("eval_reranked_s2i_R@1" in entry for entry in state["log_history"])
    assert json.loads((trained / "config.json").read_text())["k_test"] == 0
    assert json.loads((trained / "train_results.json").read_text())["epoch"] > 0
    evaluated = tmp_path / "evaluated"
    results = script.main(["--output_dir", str(evaluated), "--model_name_or_path", str(trained),
                           "--evaluation_only", "true", *common])
    assert set(results) == {"demo validation"} and "reranked_s2i_R@1" not in results["demo validation"]
    assert not (evaluated / "model.safetensors").exists()  # nothing trained, nothing saved


def test_push_to_hub_fails_before_training_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    def offline(self, repo_id, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--push_to_hub: could not create or reach the Hub repository 'someone/x'"):
        _load_script().main(["--output_dir", str(out), "--max_steps", "1", "--push_to_hub", "--hub_model_id",
                             "someone/x", "--skip_file_check", "true"])
    assert not (out / "model.safetensors").exists()  # refused before any training


def test_a_bad_test_file_fails_before_training(tmp_path):
    from c2f.data import load_demo

    rows = [dict(load_demo("validation")[i], split=split) for i, split in ((0, "train"), (3, "train"), (6, "validation"))]
    (tmp_path / "broken.wav").write_text("not audio")
    rows.append(dict(rows[0], audio=str(tmp_path / "broken.wav"), split="test"))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"(?s)manifest test: 1 bad file.*broken.wav: unreadable"):
        _load_script().main(["--dataset", "manifest", "--data_dir", str(tmp_path / "m.jsonl"), "--output_dir", str(out),
                             "--max_steps", "1", "--per_device_train_batch_size", "2"])
    assert not (out / "model.safetensors").exists()


def test_the_installed_package_trains_without_the_checkout(tmp_path):
    """`c2f-train` (c2f.train) is the same program as run_retrieval.py, and finds its model-card template inside the
    package: run from another folder, it answers --help with the script's defaults."""
    result = subprocess.run([sys.executable, "-m", "c2f.train", "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    # The console script's function returns nothing (a returned results dict would become the exit status).
    import c2f.train
    from importlib.metadata import entry_points

    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "c2f-train"]
    assert script.load() is c2f.train.entry_point
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--momentum_start_epochs" in result.stdout and "demo default 15 of 22" in result.stdout

    assert Path(c2f.train.__file__).with_name("model_card.md").is_file()
