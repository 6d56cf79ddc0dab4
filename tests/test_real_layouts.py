"""Backbones in the Hub repos' layouts (toy width, real structure), one training step on them, and multi-GPU configs."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import Blip2VisionConfig

from c2f import C2FProcessor, C2FSpeechImageModel
from c2f.backbone_checkpoints import hubert_config, write_blip2_checkpoint, write_hubert_checkpoint
from c2f.data import SpeechImageCollator, load_demo
from c2f.training import C2FTrainer, C2FTrainingArguments
from c2f.training.feature_cache import ImageFeatureCache
from c2f.training.trainer import refuse_sharded_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Toy width, every structural choice of the real configs kept (conv layers, norms, positional conv, 224 px / 14 px).
TOY_HUBERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
TOY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module", params=["base", "large"])
def backbones(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"backbones-{request.param}")
    hubert = write_hubert_checkpoint(folder / "hubert", hubert_config(request.param, **TOY_HUBERT))
    blip2 = write_blip2_checkpoint(folder / "blip2", Blip2VisionConfig(**TOY_VIT))
    return request.param, hubert, blip2


def test_checkpoints_have_the_hub_layouts(backbones):
    size, hubert, blip2 = backbones
    for folder in (hubert, blip2):
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    with safe_open(str(blip2 / "model.safetensors"), "pt") as weights:
        prefixes = {name.split(".")[0] for name in weights.keys()}
    assert {"vision_model", "qformer", "language_model", "query_tokens"} <= prefixes
    processor = C2FProcessor.from_backbones(str(hubert), str(blip2))
    # Real checkpoints differ here: layer-norm HuBERT (large) takes normalised audio and a mask, group-norm does not.
    assert processor.feature_extractor.do_normalize is (size == "large")
    assert processor(images=[torch.zeros(3, 50, 80)])["pixel_values"].shape == (1, 3, 224, 224)


def test_one_training_step_on_real_layouts_with_the_feature_cache(backbones, tmp_path):
    size, hubert, blip2 = backbones
    model = C2FSpeechImageModel.from_backbones(str(hubert), str(blip2), speech_encoder_hidden_size=32,
                                               speech_encoder_num_heads=2, speech_encoder_intermediate_size=64,
                                               multimodal_num_heads=2, multimodal_intermediate_size=64, embed_dim=16)
    model.freeze_backbones(image=True, speech_feature_encoder=True)
    assert model.speech_model.config.feat_extract_norm == ("layer" if size == "large" else "group")
    processor = C2FProcessor.from_backbones(str(hubert), str(blip2))
    rows = load_demo("train").select(range(8))
    cache = ImageFeatureCache.build(model.vision_model, processor, rows, tmp_path / "cache")
    vision_before = {name: tensor.clone() for name, tensor in model.vision_model.state_dict().items()}
    speech_before = {name: tensor.clone() for name, tensor in model.speech_model.state_dict().items()}
    args = C2FTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                                learning_rate=1e-3, queue_size=8, momentum_start_epochs=0, report_to="none",
                                save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = C2FTrainer(model=model, args=args, train_dataset=rows, processor=processor,
                         data_collator=SpeechImageCollator(processor, image_features=cache))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert trainer.queue.filled == 8
    assert all(torch.equal(tensor, vision_before[name]) for name, tensor in model.vision_model.state_dict().items())
    changed = [name for name, tensor in model.speech_model.state_dict().items() if not torch.equal(tensor, speech_before[name])]
    assert changed, "HuBERT did not train"


def test_the_training_program_freezes_what_its_arguments_say(backbones, tmp_path):
    from c2f import save_for_pipeline
    from c2f.train import ModelArguments, build_model_and_processor

    _, hubert, blip2 = backbones
    model, processor = build_model_and_processor(ModelArguments(speech_model=str(hubert), image_model=str(blip2), k_test=4))
    assert model.frozen_modules == {"vision_model"}  # BLIP-2's tower, as BLIP-2 trains; HuBERT above its conv front end
    assert not any(p.requires_grad for p in model.speech_model.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.speech_model.encoder.parameters())
    save_for_pipeline(model, processor, tmp_path / "first")
    again, _ = build_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path / "first")))
    assert again.frozen_modules == {"vision_model"}  # continuing: what the config records, frozen by the program
    unfrozen, _ = build_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path / "first"),
                                                           freeze_image_backbone=False))
    assert not unfrozen.frozen_modules and not unfrozen.config.freeze_image_backbone


def _accelerator(distributed_type: str, zero_stage: int | None = None):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("distributed_type, zero_stage, refused", [
    ("FSDP", None, "FSDP"), ("DEEPSPEED", 3, "DeepSpeed ZeRO-3"), ("DEEPSPEED", 2, None), ("MULTI_GPU", None, None),
])
def test_parameter_sharding_is_refused_when_the_momentum_model_needs_full_weights(distributed_type, zero_stage, refused):
    args = SimpleNamespace(use_queue=True, use_distillation=True)
    if refused:
        with pytest.raises(ValueError, match=f"{refused} shards every parameter.*configs/accelerate_ddp.yaml"):
            refuse_sharded_parameters(_accelerator(distributed_type, zero_stage), args)
    else:
        refuse_sharded_parameters(_accelerator(distributed_type, zero_stage), args)
    # Without queue and distillation there is no momentum copy, and sharding is fine.
    refuse_sharded_parameters(_accelerator(distributed_type, zero_stage), SimpleNamespace(use_queue=False, use_distillation=False))


def test_shipped_accelerate_configs_say_what_the_readme_promises():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(CONFIGS / "accelerate_ddp.yaml"))
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and not ddp.use_cpu
    zero2 = load_config_from_file(str(CONFIGS / "accelerate_deepspeed_zero2.yaml"))
    assert str(zero2.distributed_type).endswith("DEEPSPEED") and zero2.deepspeed_config["zero_stage"] == 2
