"""Random-weight HuBERT and BLIP-2 checkpoints in the layouts of the Hub repos c2f is used with, written offline.

Tests and benchmarks need the real loading path (`from_backbones`, `C2FProcessor.from_backbones`, the feature cache)
without downloading `facebook/hubert-base-ls960` or `Salesforce/blip2-opt-2.7b`. These writers produce folders with
the same files and weight names: `config.json` + `model.safetensors` + `preprocessor_config.json`, HuBERT's weights at
the top level, BLIP-2's vision tower under `vision_model.` beside a Q-Former and an OPT language model. c2f drops the
last two, so they are kept tiny here; the towers c2f keeps are built at whatever size the config says, full size by
default (hubert-base: 95M parameters, hubert-large: 316M, the BLIP-2 ViT-g/14: 986M).
"""

import os
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2VisionConfig,
    HubertConfig,
    HubertModel,
    Wav2Vec2FeatureExtractor,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

# facebook/hubert-large-ll60k: layer norm in the conv feature encoder and pre-norm transformer layers, unlike base.
HUBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
# The CLIP statistics BLIP-2's image processor normalises with.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def hubert_config(size: str = "base", **overrides) -> HubertConfig:
    """`HubertConfig` of hubert-base (transformers' defaults) or hubert-large, with `overrides` on top (e.g. fewer
    layers for a test that must stay small but keep the layout)."""
    if size not in ("base", "large"):
        raise ValueError(f"hubert_config: size must be 'base' or 'large', got {size!r}")
    return HubertConfig(**{**(HUBERT_LARGE if size == "large" else {}), **overrides})


def write_hubert_checkpoint(folder: str | os.PathLike, config: HubertConfig, seed: int = 0) -> Path:
    """A random `HubertModel` + its feature-extractor config, as `facebook/hubert-*` stores them. Layer-norm variants
    (large) take normalised audio with an attention mask; group-norm ones (base) take neither, as in their releases."""
    folder = Path(folder)
    torch.manual_seed(seed)
    HubertModel(config).save_pretrained(folder)
    layer_norm = config.feat_extract_norm == "layer"
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=layer_norm,
                             return_attention_mask=layer_norm).save_pretrained(folder)
    return folder


def write_blip2_checkpoint(folder: str | os.PathLike, vision_config: Blip2VisionConfig | None = None,
                           seed: int = 0) -> Path:
    """A random `Blip2ForConditionalGeneration` whose vision tower is `vision_config` (default: ViT-g/14 at 224 px,
    BLIP-2's), with a one-layer Q-Former and OPT, + the image-processor config, in `Salesforce/blip2-*`'s layout."""
    folder = Path(folder)
    vision_config = vision_config or Blip2VisionConfig()
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=vision_config.hidden_size, vocab_size=100),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                         vocab_size=100, word_embed_proj_dim=32),
        num_query_tokens=4,
    )
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    size = vision_config.image_size
    BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                          do_convert_rgb=True).save_pretrained(folder)
    return folder
