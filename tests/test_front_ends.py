"""The tiny preset's front ends: log-mel speech and a conv stem for images, shapes, masks and padding invariance."""

import numpy as np
import pytest
import torch
from transformers import HubertModel

from c2f.configuration_c2f import C2FConfig
from c2f.modeling_c2f import (C2FConvStem, C2FLogMelFeatureEncoder, C2FSpeechImageModel, cepstral_smoothing_matrix,
                              change_speed, shift_images)
from c2f.presets import tiny_config, tiny_processor


def _clips(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) * 0.1 for n in lengths]


def test_log_mel_front_end_counts_frames_with_hubert_arithmetic(model, processor):
    front_end = model.speech_model.feature_extractor
    assert isinstance(front_end, C2FLogMelFeatureEncoder)
    inputs = processor(audio=_clips(16000, 9000))
    features = front_end(inputs["input_values"], inputs["attention_mask"])
    assert features.shape[:2] == (2, model.config.speech_config.conv_dim[-1])
    expected = model.speech_model._get_feat_extract_output_lengths(torch.tensor([16000, 9000]))
    assert features.shape[2] == expected[0]
    log_mel, frame_mask = front_end.log_mel(inputs["input_values"], inputs["attention_mask"])
    assert log_mel.shape[2] == model.config.log_mel_bins
    assert frame_mask.sum(dim=1).tolist() == [(16000 - 400) // 160 + 1, (9000 - 400) // 160 + 1]
    # Normalised per clip over its own frames; padded frames are zero.
    valid = log_mel[1][frame_mask[1]]
    assert valid.mean(dim=0).abs().max() < 1e-4 and (valid.std(dim=0, unbiased=False) - 1).abs().max() < 1e-2
    assert log_mel[1][~frame_mask[1]].abs().max() == 0


def test_speech_embedding_ignores_its_batch_neighbours(model, processor):
    model.eval()
    clip, longer = _clips(16000, 48000)
    with torch.no_grad():
        alone = model.encode_speech(**processor(audio=[clip]))
        batched = model.encode_speech(**processor(audio=[clip, longer]))
    cosine = torch.nn.functional.cosine_similarity(alone.speech_embeds, batched.speech_embeds[:1]).item()
    assert cosine >= 0.999
    tokens = alone.speech_tokens.shape[1]
    assert torch.allclose(alone.speech_tokens[0], batched.speech_tokens[0, :tokens], atol=1e-4)
    assert not batched.speech_token_mask[0, tokens:].any()


def test_group_norm_hubert_encodes_each_clip_at_its_own_length_at_inference(processor):
    """HF's group-norm HuBERT (hubert-base) takes no mask: batched, padding would change the clip's embedding."""
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config(speech_front_end="waveform")).eval()
    assert model.config.speech_config.feat_extract_norm == "group"
    clip, longer = _clips(16000, 48000)
    with torch.no_grad():
        alone = model.get_speech_features(**processor(audio=[clip]))
        batched = model.get_speech_features(**processor(audio=[clip, longer]))
        model.unpadded_speech_inference = False  # as a trainer's momentum copy runs it: one padded batch
        padded = model.get_speech_features(**processor(audio=[clip, longer]))
    assert torch.nn.functional.cosine_similarity(alone, batched[:1]).item() >= 0.999
    assert torch.nn.functional.cosine_similarity(alone, padded[:1]).item() < 0.999  # what the per-clip path avoids


def test_frequency_warp_applies_in_training_only(processor):
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config(speech_frequency_warp=0.1))
    front_end = model.speech_model.feature_extractor
    inputs = processor(audio=_clips(16000))
    front_end.eval()
    plain = front_end.log_mel(inputs["input_values"])[0]
    assert torch.equal(plain, front_end.log_mel(inputs["input_values"])[0])
    front_end.train()
    torch.manual_seed(1)
    warped = front_end.log_mel(inputs["input_values"])[0]
    torch.manual_seed(1)
    assert torch.equal(warped, front_end.log_mel(inputs["input_values"])[0])  # seeded
    assert not torch.allclose(warped, plain, atol=1e-3)


def test_shift_images_moves_pixels_and_repeats_the_border():
    image = torch.zeros(1, 1, 6, 6)
    image[0, 0, 2, 3] = 1.0
    image[0, 0, 0, :] = 0.5  # top row
    moved = shift_images(image, 2, -1)
    assert moved[0, 0, 4, 2] == 1.0 and moved.sum() == 1.0 + 0.5 * 6 * 3  # two rows of border repeated in from the top
    assert torch.equal(shift_images(moved, -2, 1)[0, 0, 2, 3], image[0, 0, 2, 3])


def test_change_speed_plays_each_clip_faster_from_its_own_samples():
    tone = torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000)
    batch = torch.stack([tone, torch.cat([tone[:8000], torch.zeros(8000)])])
    faster, mask = change_speed(batch, torch.tensor([[1] * 16000, [1] * 8000 + [0] * 8000]), 1.25)
    assert faster.shape == (2, 12800) and mask.sum(dim=1).tolist() == [12800, 6400]
    spectrum = torch.fft.rfft(faster[0]).abs()
    assert abs(spectrum.argmax().item() * 16000 / 12800 - 550) <= 2  # pitch x 1.25
    alone, _ = change_speed(tone[None, :8000], None, 1.25)
    assert torch.equal(alone[0], faster[1, :6400]) and not faster[1, 6400:].any()  # its padding never entered
    assert change_speed(tone[None, :1000], None, 2.0, min_samples=800)[0].shape == (1, 800)


def test_test_time_views_average_faster_slower_clips_and_shifted_images_at_inference_only(processor):
    """In eval mode an embedding is the normalised mean of the unit embeddings of its views: the clip as heard and at
    each speed, the image and its four 2 px shifts. Training and the SIM tokens see one view."""
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config(speech_frequency_warp=0.0, test_time_speeds=(0.9, 1.1),
                                            test_time_image_shift=0.03)).eval()
    inputs = processor(audio=_clips(16000, 9600))
    images = torch.rand(2, 3, 64, 64)
    unit = torch.nn.functional.normalize
    with torch.no_grad():
        speech, pictures = model.encode_speech(**inputs), model.encode_image(images)
        model.test_time_views = False
        one_clip_view, one_image_view = model.encode_speech(**inputs), model.encode_image(images)
        played = [model.get_speech_features(*change_speed(inputs["input_values"], inputs["attention_mask"], speed))
                  for speed in (0.9, 1.1)]
        shifted = [model.get_image_features(shift_images(images, down, right))
                   for down, right in ((2, 0), (-2, 0), (0, 2), (0, -2))]
        model.test_time_views = True
        model.train()
        trained_clip, trained_image = model.encode_speech(**inputs), model.encode_image(images)
    assert torch.allclose(speech.speech_embeds, unit(one_clip_view.speech_embeds + sum(played)), atol=1e-6)
    assert not torch.allclose(speech.speech_embeds, one_clip_view.speech_embeds, atol=1e-3)
    assert torch.allclose(pictures.image_embeds, unit(one_image_view.image_embeds + sum(shifted)), atol=1e-6)
    assert not torch.allclose(pictures.image_embeds, one_image_view.image_embeds, atol=1e-3)
    assert torch.equal(speech.speech_tokens, one_clip_view.speech_tokens)
    assert torch.equal(pictures.image_tokens, one_image_view.image_tokens)
    assert torch.allclose(trained_clip.speech_embeds, one_clip_view.speech_embeds, atol=1e-6)
    assert torch.allclose(trained_image.image_embeds, one_image_view.image_embeds, atol=1e-6)


def test_match_scores_skip_the_test_time_views_it_does_not_read(processor):
    """SIM reads one view's tokens, so scoring pairs from raw inputs runs each tower once, views or not."""
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config()).eval()
    inputs, images = processor(audio=_clips(16000, 9600)), torch.rand(2, 3, 64, 64)
    calls = {"vision": 0, "speech encoder": 0}
    model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    model.speech_encoder.register_forward_hook(lambda *_: calls.__setitem__("speech encoder", calls["speech encoder"] + 1))
    with torch.no_grad():
        scores = model.match_scores(inputs["input_values"], images, inputs["attention_mask"])
        assert calls == {"vision": 1, "speech encoder": 1}
        full = model.match_scores(speech_output=model.encode_speech(**inputs), image_output=model.encode_image(images))
    assert calls == {"vision": 1 + 5, "speech encoder": 1 + 3}  # the full outputs do average the views
    assert torch.allclose(scores, full, atol=1e-6)


def test_cepstral_smoothing_keeps_the_envelope_and_drops_the_harmonic_ripple():
    """A log-mel frame made of a slow envelope plus a fast ripple (what pitch harmonics leave across mel bands): the
    first 13 cepstral coefficients keep the envelope and remove the ripple."""
    bins = 40
    band = np.arange(bins)
    envelope = np.cos(np.pi * 2 * (band + 0.5) / bins)  # DCT component 2
    ripple = np.cos(np.pi * 30 * (band + 0.5) / bins)  # DCT component 30
    smoothing = cepstral_smoothing_matrix(bins, 13)
    assert np.allclose((envelope + ripple) @ smoothing, envelope, atol=1e-5)
    assert np.allclose(smoothing @ smoothing, smoothing, atol=1e-5)  # a projection: smoothing twice changes nothing
    assert cepstral_smoothing_matrix(bins, 0) is None and cepstral_smoothing_matrix(bins, bins) is None


def test_cepstral_front_end_feeds_the_smoothed_log_mel(processor):
    """The front end's features are the plain log-mel projected, then normalised per clip."""
    torch.manual_seed(0)
    smoothed = C2FSpeechImageModel(tiny_config(log_mel_cepstral_coefficients=13)).speech_model.feature_extractor.eval()
    plain = C2FSpeechImageModel(tiny_config()).speech_model.feature_extractor.eval()
    inputs = processor(audio=_clips(16000, 9000))
    features, mask = smoothed.log_mel(inputs["input_values"], inputs["attention_mask"])
    reference, _ = plain.log_mel(inputs["input_values"], inputs["attention_mask"])
    assert features.shape == reference.shape
    assert not torch.allclose(features, reference, atol=1e-2)
    projection = torch.from_numpy(cepstral_smoothing_matrix(40, 13))
    # Per-clip normalisation of reference is affine per band, and the projection mixes bands: compare after projecting
    # the unnormalised log-mel of one clip by hand.
    frames = inputs["input_values"][:1, :16000].unfold(1, 400, 160)
    power = torch.fft.rfft(frames * torch.hann_window(400), n=400).abs().square()
    log_mel = torch.log(power @ torch.from_numpy(plain._mel_filters) + 1e-6) @ projection
    expected = (log_mel - log_mel.mean(dim=1, keepdim=True)) / (log_mel.var(dim=1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert torch.allclose(features[:1, : expected.shape[1]], expected, atol=1e-3)


def test_conv_stem_keeps_the_patch_grid(batch):
    config = tiny_config()
    stem = C2FConvStem(config.vision_config)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    assert stem(batch["pixel_values"]).shape == (4, config.vision_config.hidden_size, grid, grid)
    assert stem.weight is stem.projection.weight


def test_front_ends_survive_save_and_load(model, processor, batch, tmp_path):
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = C2FSpeechImageModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.vision_model.embeddings.patch_embedding, C2FConvStem)
    with torch.no_grad():
        assert torch.allclose(loaded.get_speech_features(batch["input_values"], batch["attention_mask"]),
                              model.get_speech_features(batch["input_values"], batch["attention_mask"]), atol=1e-6)
        assert torch.allclose(loaded.get_image_features(batch["pixel_values"]),
                              model.get_image_features(batch["pixel_values"]), atol=1e-6)


def test_real_checkpoint_front_ends_are_hubert_and_blip2_modules():
    model = C2FSpeechImageModel(tiny_config(speech_front_end="waveform", vision_stem="patch"))
    assert type(model.speech_model.feature_extractor).__name__ == "HubertFeatureEncoder"
    assert isinstance(model.vision_model.embeddings.patch_embedding, torch.nn.Conv2d)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(speech_front_end="mfcc"), "speech_front_end"),
        (dict(vision_stem="cnn"), "vision_stem"),
        (dict(vision_stem="conv", vision_config=dict(patch_size=6, image_size=60)), "power-of-two"),
        (dict(speech_frequency_warp=1.5), "speech_frequency_warp"),
        (dict(log_mel_cepstral_coefficients=41), "log_mel_cepstral_coefficients"),
        (dict(speech_layer_pooling="weighted_sum"), "speech_layer_pooling='last'"),
        (dict(test_time_speeds=(0.9, 3.0)), "test_time_speeds"),
        (dict(test_time_image_shift=0.5), "test_time_image_shift"),
    ],
)
def test_config_rejects_unusable_front_ends(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_clips_shorter_than_one_frame_are_refused_alone_and_in_a_batch(model, processor):
    needed = model.config.min_audio_samples
    assert needed == (((1 - 1) * 2 + 3 - 1) * 2 + 3 - 1) * 160 + 400  # log-mel window, then two stride-2 Conv1d
    assert C2FSpeechImageModel(tiny_config(speech_front_end="waveform",
                                           speech_config=dict(conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                                                              conv_dim=(8,) * 7, num_feat_extract_layers=7, hidden_size=64,
                                                              num_hidden_layers=1, num_attention_heads=4,
                                                              intermediate_size=64))).config.min_audio_samples == 400
    model.eval()
    short, long = _clips(needed - 1, 16000)
    for clips in ([short], [long, short]):
        with pytest.raises(ValueError, match=rf"has {needed - 1} samples .*at least {needed} samples"):
            model.get_speech_features(**processor(audio=clips))
    assert model.get_speech_features(**processor(audio=_clips(needed))).shape == (1, model.config.embed_dim)
