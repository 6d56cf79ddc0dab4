"""Named model sizes, so tests, the demo run and benchmarks build the same small models from one place."""

from .configuration_c2f import C2FConfig


def tiny_config(**overrides) -> C2FConfig:
    """A C2F model small enough to train on a laptop CPU in minutes.

    HuBERT's feature projection and transformer encoder behind a log-mel front end (40 ms frames); the BLIP-2 vision
    tower sees 64 px images through a conv stem down to 8 px patches.
    """
    settings = dict(
        speech_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            # Frame arithmetic of the log-mel front end (speech_front_end below): 25 ms windows with a 10 ms hop,
            # then two stride-2 Conv1d to 40 ms frames. Twice HuBERT's 20 ms, and half the training step time on the
            # demo (0.14 -> 0.07 s a batch of 32 on 2 cores); the words it must hear last 300 ms and more.
            num_feat_extract_layers=3,
            conv_dim=(64, 64, 64),
            conv_kernel=(400, 3, 3),
            conv_stride=(160, 2, 2),
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
            # every image to the same features. 0.2 rather than the usual 0.02: random features that differ between
            # images from the start (fitting 85 demo images: 98% in 200 steps, against 8% at 0.02).
            initializer_range=0.2,
        ),
        # From scratch, HuBERT's waveform convolutions memorise the training voices: a log-mel front end took a
        # probe's held-out-voice test S->I R@1 from 6.5 to 25.6 at equal steps, and a conv stem in front of the ViT
        # helped next (the two together: 33.5). The frequency warp (+-10%) is a voice augmentation.
        speech_front_end="log_mel",
        log_mel_bins=40,
        speech_frequency_warp=0.1,
        # Inference averages each clip with it played at 0.9 and 1.1 times the speed, and each image with four 2 px
        # shifts: the augmentations it trained with. On the held-out-voice validation split, mean of 14 trained demo
        # models: +3.5 R@1 (both directions summed); four speeds +3.8 at twice the cost, frequency warps +0.5.
        test_time_speeds=(0.9, 1.1),
        test_time_image_shift=0.03,
        vision_stem="conv",
        speech_encoder_hidden_size=64,
        # Two layers, the config's default (DESIGN.md: "a few transformer layers"), as the image tower has. One layer
        # until the fourteenth session: seeds 42 / 0 / 1 / 2 on the held-out-voice validation split, summed over both
        # directions, +1.1 on average (+12.3 / +0.8 / -5.8 / -2.9): a tie, which goes to the design. A training step
        # costs about 4% more (207 against 198 ms a batch of 32).
        speech_encoder_num_layers=2,
        # Without positions of its own a pooled clip heard which objects, not in which order: "A to the left of B" and
        # "B to the left of A" got speech embeddings at cosine 0.995, and the model picked between such twins at
        # chance (docs/demo_measurements.md). With them and nearest-neighbour batches (`batch_neighbours`, the
        # demo's default), seeds 42 / 0 / 1 on the held-out-voice validation split: +8.0 R@1 summed over both
        # directions on average, no seed lower. No parameters: one addition per token.
        speech_encoder_positions="sinusoidal",
        speech_encoder_num_heads=4,
        speech_encoder_intermediate_size=128,
        multimodal_num_layers=1,
        # This tower, trained from scratch through pooled embeddings, leaves little of where each patch is in its
        # tokens, and cross-attention reads tokens as a set: SIM picked between arrangement twins at chance (51%, six
        # GPU seeds). With 2D positions on the tokens SIM reads, seeds 0 / 1 / 2 rank the right twin first 87% / 58% /
        # 82% of the time and re-ranking lifts test R@1 by +19 / +2 / +19 S->I; held-out voices, re-ranked, summed:
        # +8.9 on average (docs/demo_measurements.md). No parameters: one addition per image token.
        multimodal_image_positions="sinusoidal",
        multimodal_num_heads=4,
        multimodal_intermediate_size=128,
        embed_dim=64,
        k_test=16,
        hidden_dropout=0.0,
        # The c2f layers (speech encoder, projections, SIM) start wider than BERT's 0.02 too: SIC on 256 demo pairs
        # reached 64% train R@1 in 160 steps, against 17% at 0.02.
        initializer_range=0.1,
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
