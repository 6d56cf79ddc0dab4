import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2VisionModel
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from c2f.backbone_checkpoints import write_blip2_checkpoint, write_hubert_checkpoint
from c2f.modeling_c2f import C2FSpeechEncoder, C2FSpeechImageModel, downsample_frames, sic_loss
from c2f.processing_c2f import C2FProcessor
from c2f.presets import tiny_config


def _inputs(batch):
    return dict(input_values=batch["input_values"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])


def test_output_shapes_and_normalised_embeddings(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**_inputs(batch), image_ids=batch["image_ids"], return_loss=True)
    assert out.speech_embeds.shape == out.image_embeds.shape == (4, 64)
    assert torch.allclose(out.speech_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert out.logits_per_speech.shape == (4, 4) and torch.equal(out.logits_per_image, out.logits_per_speech.t())
    # The in-batch SIC of the pure loss function, and no combined loss: weighting the two is the trainer's business.
    assert torch.allclose(out.loss_sic, sic_loss(out.speech_embeds, out.image_embeds, batch["image_ids"], out.temperature)[0])
    assert out.loss_sim.isfinite() and "loss" not in out
    # 4 positives; 4 image negatives; speech negatives for every image (ids 0,0,1,2 always leave a negative).
    assert out.match_logits.shape == (12, 2) and out.match_labels.tolist() == [1] * 4 + [0] * 8
    tokens = out.speech_output.speech_tokens
    assert tokens.shape[0] == 4 and tokens.shape[-1] == 64
    # Shorter clips have padding tokens masked out; CLS is always valid.
    mask = out.speech_output.speech_token_mask
    assert mask[:, 0].all() and mask[3].sum() < mask[2].sum()
    assert out.image_output.image_tokens.shape == (4, 1 + 64, 64)


def test_public_feature_api_matches_forward(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**_inputs(batch))
        speech = model.get_speech_features(batch["input_values"], batch["attention_mask"])
        images = model.get_image_features(batch["pixel_values"])
        raw = model.get_image_features(batch["pixel_values"], normalize=False)
        scores = model.match_scores(batch["input_values"], batch["pixel_values"], batch["attention_mask"])
    assert torch.allclose(speech, out.speech_embeds) and torch.allclose(images, out.image_embeds)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4))
    assert scores.shape == (4,) and ((scores > 0) & (scores < 1)).all()


def test_rerank_puts_sim_scored_candidates_first_with_their_match_probabilities(model, batch):
    model.eval()
    with torch.no_grad():
        speech = model.encode_speech(batch["input_values"], batch["attention_mask"])
        images = model.encode_image(batch["pixel_values"])
        coarse = speech.speech_embeds @ images.image_embeds.t()
        args = (speech.speech_tokens, speech.speech_token_mask, images.image_tokens, 2)
        by_speech = model.rerank(coarse, *args, queries_are_speech=True)
        by_image = model.rerank(coarse.t(), *args, queries_are_speech=False)
        rows = torch.arange(4).repeat_interleave(2)
        cols = coarse.argsort(dim=1, descending=True, stable=True)[:, :2].reshape(-1)  # images 0 and 1 are one: a tie
        logits = model.match_logits(speech.speech_tokens[rows], speech.speech_token_mask[rows], images.image_tokens[cols])
    for ranked, scores in ((by_speech, coarse), (by_image, coarse.t())):
        top = scores.argsort(dim=1, descending=True, stable=True)[:, :2]  # ties keep column order
        assert torch.equal(ranked.reranked.sum(dim=1), torch.full((4,), 2))
        assert ranked.reranked.gather(1, top).all()
        # No made-up scores: pairs the SIM head did not score have none; `order` places them.
        assert ranked.match_scores[~ranked.reranked].isnan().all() and ranked.fine_scores[~ranked.reranked].isnan().all()
        assert torch.equal(ranked.coarse_scores, scores)
        first, rest = ranked.order[:, :2], ranked.order[:, 2:]
        assert ranked.reranked.gather(1, first).all() and not ranked.reranked.gather(1, rest).any()
        assert (ranked.fine_scores.gather(1, first).diff(dim=1) <= 0).all()  # re-scored ones by fine score
        assert (scores.gather(1, rest).diff(dim=1) <= 0).all()  # then the others by cosine
        margins = torch.logit(ranked.match_scores.gather(1, top))
        temperature = model.get_temperature()
        assert torch.allclose(ranked.fine_scores.gather(1, top), margins + scores.gather(1, top) / temperature, atol=1e-3)
    assert torch.allclose(by_speech.match_scores[rows, cols], logits.softmax(dim=-1)[:, 1], atol=1e-5)
    coarse_only = model.rerank(coarse, *args[:3], 0)
    assert not coarse_only.reranked.any() and torch.equal(coarse_only.order, coarse.argsort(dim=1, descending=True, stable=True))
    result = by_speech.results(0, 3)  # what the pipeline and the index return, by value
    column = int(by_speech.order[0, 0])
    assert result[0] == {"index": column, "coarse_score": pytest.approx(float(coarse[0, column])),
                         "score": pytest.approx(float(by_speech.fine_scores[0, column])),
                         "match_score": pytest.approx(float(by_speech.match_scores[0, column]))}
    third = int(by_speech.order[0, 2])
    assert result[2] == {"index": third, "coarse_score": pytest.approx(float(coarse[0, third])),
                         "score": pytest.approx(float(coarse[0, third]))}


def test_padding_does_not_change_a_clip_embedding_with_layer_norm_hubert(batch, processor):
    # feat_extract_norm="layer" HuBERT takes the attention mask, so padding must not leak into the embedding.
    model = C2FSpeechImageModel(tiny_config(speech_config=dict(tiny_config().speech_config.to_dict(), feat_extract_norm="layer", do_stable_layer_norm=True))).eval()
    alone = processor(audio=[batch["input_values"][3, :4800].numpy()], sampling_rate=16000)
    with torch.no_grad():
        single = model.get_speech_features(alone["input_values"], alone["attention_mask"])
        padded = model.get_speech_features(batch["input_values"], batch["attention_mask"])[3:]
    assert torch.allclose(single, padded, atol=1e-5)


@pytest.mark.parametrize("positions", ["none", "sinusoidal"])
def test_speech_positions_make_the_pooled_token_depend_on_word_order(positions):
    """Self-attention alone cannot tell a clip from its frames reversed (its CLS output is the same); with positions
    the order is part of what the speech tokens say."""
    torch.manual_seed(0)
    encoder = C2FSpeechEncoder(tiny_config(speech_encoder_positions=positions)).eval()
    frames = torch.randn(1, 12, tiny_config().speech_config.hidden_size)
    mask = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        forward, backward = encoder(frames, mask)[0][:, 0], encoder(frames.flip(1), mask)[0][:, 0]
    assert torch.allclose(forward, backward, atol=1e-5) == (positions == "none")


@pytest.mark.parametrize("positions", ["none", "sinusoidal"])
def test_image_positions_let_sim_tell_an_image_from_its_mirror(positions):
    """Cross-attention alone reads image tokens as a set: a left-right mirror of the patch grid (the same tokens in
    another order) gets the same match logits. With image positions, where a patch is is part of what SIM reads."""
    torch.manual_seed(0)
    config = tiny_config(multimodal_image_positions=positions)
    model = C2FSpeechImageModel(config).eval()
    side = config.vision_config.image_size // config.vision_config.patch_size
    speech = torch.randn(1, 6, config.speech_encoder_hidden_size)
    image = torch.randn(1, 1 + side * side, config.vision_config.hidden_size)
    patches = image[:, 1:].reshape(1, side, side, -1)
    mirrored = torch.cat([image[:, :1], patches.flip(2).reshape(1, side * side, -1)], dim=1)
    mask = torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        same = torch.allclose(model.match_logits(speech, mask, image), model.match_logits(speech, mask, mirrored), atol=1e-5)
    assert same == (positions == "none")


def test_image_positions_need_a_square_patch_grid():
    encoder = C2FSpeechImageModel(tiny_config(multimodal_image_positions="sinusoidal")).multimodal_encoder
    with pytest.raises(ValueError, match="square patch grid"):
        encoder(torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 7, 64))


def test_precomputed_image_hidden_states_give_the_same_embeddings(model, batch):
    model.eval()
    model.test_time_views = False  # hidden states (a feature cache) are one view of each image
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        assert torch.equal(model.get_image_features(image_hidden_states=hidden), model.get_image_features(batch["pixel_values"]))


def test_sim_draws_clips_negative_images_from_the_extra_images_too(model, batch):
    """Extra images (the trainer's queue) are more candidates for each clip's hard-negative image: scored by their own
    tokens, never one of the clip's own image."""
    model.eval()
    same = torch.zeros(4, dtype=torch.long)  # one image for all four: the batch holds no negative at all
    with torch.no_grad():
        extra = model.encode_image(batch["pixel_values"][3:].flip(-1))  # an image unlike any in the batch
        alone = model(**_inputs(batch), image_ids=same, return_loss=True)
        assert alone.match_labels.tolist() == [1] * 4
        # The same image again under its own id: a positive, never drawn.
        own = model(**_inputs(batch), image_ids=same, return_loss=True,
                    sim_negative_images=(extra.image_tokens, extra.image_embeds, torch.tensor([0])))
        assert own.match_labels.tolist() == [1] * 4
        out = model(**_inputs(batch), image_ids=same, return_loss=True,
                    sim_negative_images=(extra.image_tokens, extra.image_embeds, torch.tensor([99])))
        speech = out.speech_output
        expected = model.match_logits(speech.speech_tokens, speech.speech_token_mask, extra.image_tokens.expand(4, -1, -1))
    assert out.match_labels.tolist() == [1] * 4 + [0] * 4  # each clip with the extra image; no clip for any image
    torch.testing.assert_close(out.match_logits[4:], expected)


def test_loss_decreases_on_a_fixed_batch(model, batch):
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        out = model(**_inputs(batch), image_ids=batch["image_ids"], return_loss=True)
        optimizer.zero_grad()
        (out.loss_sic + out.loss_sim).backward()
        optimizer.step()
        losses.append(out.loss_sic.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_freezing_is_an_explicit_call_and_loading_returns_what_was_saved(batch, tmp_path):
    model = C2FSpeechImageModel(tiny_config())
    assert not model.frozen_modules and all(p.requires_grad for p in model.parameters())  # building freezes nothing
    model.freeze_backbones(image=True, speech=True)
    out = model(**_inputs(batch), image_ids=batch["image_ids"], return_loss=True)
    (out.loss_sic + out.loss_sim).backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(p.grad is None for p in model.speech_model.parameters())
    assert model.speech_projection.weight.grad is not None and model.match_head.weight.grad is not None
    model.train()
    assert not model.vision_model.training and not model.speech_model.training and model.speech_encoder.training
    assert model.config.freeze_image_backbone and model.config.freeze_speech_backbone  # a record of how it trained
    model.save_pretrained(tmp_path)
    loaded = C2FSpeechImageModel.from_pretrained(tmp_path)
    assert loaded.config.freeze_image_backbone  # the record survives; loading does not act on it
    assert not loaded.frozen_modules and all(p.requires_grad for p in loaded.parameters())
    assert loaded.train().vision_model.training


def test_speech_feature_encoder_freezing_only_freezes_the_cnn(batch):
    model = C2FSpeechImageModel(tiny_config()).freeze_backbones(speech_feature_encoder=True)
    assert model.config.freeze_speech_feature_encoder and not model.frozen_modules  # trains in train mode
    model(**_inputs(batch), image_ids=batch["image_ids"], return_loss=True).loss_sic.backward()
    assert all(p.grad is None for p in model.speech_model.feature_extractor.parameters())
    assert any(p.grad is not None for p in model.speech_model.encoder.parameters())


def test_weighted_sum_layer_pooling_learns_layer_weights(batch):
    model = C2FSpeechImageModel(tiny_config(speech_front_end="waveform", speech_layer_pooling="weighted_sum"))
    assert model.speech_layer_weights.shape == (3,)
    model(**_inputs(batch), image_ids=batch["image_ids"], return_loss=True).loss_sic.backward()
    assert model.speech_layer_weights.grad is not None and model.speech_layer_weights.grad.abs().sum() > 0


def test_downsample_frames_ignores_padding():
    frames = torch.tensor([[[1.0], [3.0], [5.0], [100.0]]])
    mask = torch.tensor([[True, True, True, False]])
    pooled, pooled_mask = downsample_frames(frames, mask, 2)
    assert pooled.flatten().tolist() == [2.0, 5.0] and pooled_mask.tolist() == [[True, True]]
    pooled, pooled_mask = downsample_frames(frames[:, :3], mask[:, :3], 2)  # odd length is padded, not dropped
    assert pooled.flatten().tolist() == [2.0, 5.0]


def _saved_weights(folder, prefix: str = "") -> dict[str, torch.Tensor]:
    weights = load_file(str(folder / "model.safetensors"))
    return {name[len(prefix):]: tensor for name, tensor in weights.items() if name.startswith(prefix)}


@pytest.mark.parametrize("vision_layout", ["full_blip2", "vision_only"])
def test_from_backbones_loads_the_pretrained_weights(tmp_path, config, vision_layout):
    write_hubert_checkpoint(tmp_path / "hubert", config.speech_config, seed=3)
    if vision_layout == "full_blip2":
        write_blip2_checkpoint(tmp_path / "blip2", config.vision_config, seed=3)
        vision_weights = _saved_weights(tmp_path / "blip2", "vision_model.")
    else:
        torch.manual_seed(3)
        Blip2VisionModel(config.vision_config).save_pretrained(tmp_path / "blip2")
        BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "blip2")
        vision_weights = _saved_weights(tmp_path / "blip2")
    # The checkpoints' own preprocessing configs, as on the Hub: group-norm HuBERT takes unnormalised audio.
    processor = C2FProcessor.from_backbones(str(tmp_path / "hubert"), str(tmp_path / "blip2"))
    assert processor.feature_extractor.do_normalize is False
    size = 32 if vision_layout == "vision_only" else config.vision_config.image_size
    assert processor(images=[torch.zeros(3, 50, 50)])["pixel_values"].shape == (1, 3, size, size)
    model = C2FSpeechImageModel.from_backbones(str(tmp_path / "hubert"), str(tmp_path / "blip2"), embed_dim=32, k_test=5)
    assert model.config.embed_dim == 32 and model.config.k_test == 5
    for name, tensor in _saved_weights(tmp_path / "hubert").items():
        assert torch.equal(model.speech_model.state_dict()[name], tensor), name
    assert len(vision_weights) == len(model.vision_model.state_dict())
    for name, tensor in vision_weights.items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    assert all(p.requires_grad for p in model.parameters())  # loading freezes nothing: training code decides


def test_from_backbones_refuses_a_checkpoint_without_vision_weights(tmp_path, config):
    write_hubert_checkpoint(tmp_path / "hubert", config.speech_config)
    with pytest.raises(ValueError, match="backbone weights were not found.*expected a HuBERT or BLIP-2 checkpoint"):
        C2FSpeechImageModel.from_backbones(str(tmp_path / "hubert"), str(tmp_path / "hubert"))
