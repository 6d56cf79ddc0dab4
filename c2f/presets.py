"""Named model sizes, so tests, the demo run and benchmarks build the same small models from one place."""

from .configuration_c2f import C2FConfig


def tiny_config(**overrides) -> C2FConfig:
    """A C2F model small enough to train on a laptop CPU in minutes (0.28M parameters).

    HuBERT keeps its 320x convolutional downsampling (20 ms frames) but with narrow channels; the vision tower sees
    64 px images in 8 px patches.
    """
    settings = dict(
        speech_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            conv_dim=(32, 32, 32, 32, 32, 32, 32),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            mask_time_prob=0.0,
            # Trained from scratch on a few thousand clean clips: regularisation only slows it down.
            hidden_dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            feat_proj_dropout=0.0,
            layerdrop=0.0,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            # BLIP-2's default (1e-10) is meant to be overwritten by a checkpoint; a random tower built with it maps
            # every image to the same features.
            initializer_range=0.02,
        ),
        speech_encoder_hidden_size=64,
        speech_encoder_num_layers=1,
        speech_encoder_num_heads=4,
        speech_encoder_intermediate_size=128,
        multimodal_num_layers=1,
        multimodal_num_heads=4,
        multimodal_intermediate_size=128,
        embed_dim=64,
        k_test=16,
        hidden_dropout=0.0,
        freeze_speech_feature_encoder=False,
    )
    settings.update(overrides)
    return C2FConfig(**settings)


def tiny_processor(image_size: int = 64):
    """The processor that goes with `tiny_config`: 16 kHz audio, `image_size` px images."""
    from transformers import Wav2Vec2FeatureExtractor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from .processing_c2f import C2FProcessor

    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return C2FProcessor(feature_extractor, image_processor)
