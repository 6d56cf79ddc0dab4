import pytest
from transformers import Blip2VisionConfig, HubertConfig

from c2f.configuration_c2f import C2FConfig
from c2f.presets import tiny_config


def test_config_round_trip_through_save_and_dict(tmp_path):
    config = tiny_config(embed_dim=48, k_test=7, speech_front_end="waveform", speech_layer_pooling="weighted_sum")
    config.save_pretrained(tmp_path)
    loaded = C2FConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.speech_config, HubertConfig) and loaded.speech_config.hidden_size == 64
    assert isinstance(loaded.vision_config, Blip2VisionConfig) and loaded.vision_config.patch_size == 8
    assert (loaded.embed_dim, loaded.k_test, loaded.speech_layer_pooling) == (48, 7, "weighted_sum")
    assert (loaded.speech_front_end, loaded.vision_stem, loaded.log_mel_bins) == ("waveform", "conv", 40)
    assert C2FConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_defaults_follow_the_design_card():
    config = C2FConfig()
    assert config.speech_config.hidden_size == 768  # hubert-base
    assert config.vision_config.hidden_size == 1408  # BLIP-2 ViT-g
    # Freezing is the training code's call; the config only records it, and records nothing frozen by default.
    assert not (config.freeze_image_backbone or config.freeze_speech_backbone or config.freeze_speech_feature_encoder)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"speech_layer_pooling": "mean"}, "speech_layer_pooling"),
        ({"speech_frame_downsample": 0}, "speech_frame_downsample"),
        ({"speech_encoder_positions": "learned"}, "speech_encoder_positions"),
        ({"multimodal_image_positions": "learned"}, "multimodal_image_positions"),
        ({"speech_encoder_num_heads": 5}, "speech_encoder_hidden_size"),
        ({"temperature_init": 0.9}, "temperature"),
        ({"k_test": -1}, "k_test"),
    ],
)
def test_bad_settings_are_rejected_with_the_field_name(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)
