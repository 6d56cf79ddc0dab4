"""Configuration for c2f, the coarse-to-fine speech-image retrieval model.

This file is copied verbatim to a Hub repository by `save_pretrained`, so it imports only transformers.
"""

from transformers import Blip2VisionConfig, HubertConfig, PreTrainedConfig


class C2FConfig(PreTrainedConfig):
    r"""
    Configuration of a [`C2FSpeechImageModel`]: a HuBERT speech backbone followed by a small speech encoder, a BLIP-2
    vision tower, a shared embedding space for speech-image contrastive (SIC) learning and a multimodal transformer for
    speech-image matching (SIM). The defaults follow the reconstruction in our design notes (ALBEF defaults where the
    paper is silent); the backbone defaults are the shapes of `facebook/hubert-base-ls960` and BLIP-2's ViT-g.

    Args:
        speech_config (`dict` or [`HubertConfig`], *optional*):
            Configuration of the HuBERT speech backbone.
        vision_config (`dict` or [`Blip2VisionConfig`], *optional*):
            Configuration of the BLIP-2 vision tower.
        speech_front_end (`str`, *optional*, defaults to `"waveform"`):
            What turns 16 kHz audio into HuBERT's frame features. `"waveform"`: HuBERT's own convolutional feature
            encoder, as in every pretrained HuBERT checkpoint. `"log_mel"`: a log-mel filterbank computed inside the
            model (plain torch ops; window `conv_kernel[0]`, hop `conv_stride[0]` of the speech config), normalised per
            clip, then `Conv1d` layers with the speech config's remaining kernels, strides and widths; HuBERT's feature
            projection and transformer encoder follow as usual. Meant for towers trained from scratch.
        log_mel_bins (`int`, *optional*, defaults to 40):
            Mel bands of the `"log_mel"` front end.
        log_mel_cepstral_coefficients (`int`, *optional*, defaults to 0):
            With `k > 0`, the `"log_mel"` front end keeps only the first `k` cepstral coefficients of each frame's
            log-mel (a DCT, truncated, and back to mel bands): the smooth spectral envelope, which carries the words,
            without the pitch harmonics and fine detail, which carry the voice. The features keep `log_mel_bins`
            bands. 0 keeps the log-mel as it is.
        speech_frequency_warp (`float`, *optional*, defaults to 0.0):
            Training-time voice augmentation of the `"log_mel"` front end (like HuBERT's own SpecAugment, applied only
            in training mode): each clip's spectrum is stretched along frequency by a factor drawn uniformly from
            `[1 - w, 1 + w]` (vocal-tract-length perturbation). 0 disables it.
        test_time_speeds (`list[float]`, *optional*, defaults to `()`):
            Inference-time views of a clip: the speech embedding (in eval mode) is the mean of the clip's unit
            embedding as heard and played at each of these speeds (1/speed as long, pitch times speed: the speed
            perturbation of training), so a voice the model never heard is met at several pitches and tempos at once.
            The SIM head reads the tokens of the clip as heard. Empty: one view.
        test_time_image_shift (`float`, *optional*, defaults to 0.0):
            Inference-time views of an image: with `s > 0` the image embedding (in eval mode) is the mean of the unit
            embeddings of the image and of four copies moved `round(s * side)` pixels up, down, left and right (border
            pixels repeated, as the training shifts do). The SIM head reads the unshifted tokens. 0: one view.
        vision_stem (`str`, *optional*, defaults to `"patch"`):
            How image pixels become patch tokens. `"patch"`: BLIP-2's patch embedding (one strided convolution), as in
            every pretrained BLIP-2 checkpoint. `"conv"`: stride-2 3x3 convolutions down to the patch grid, then a
            1x1 projection (an early-convolution stem); needs a power-of-two `patch_size`. Meant for towers trained
            from scratch.
        speech_layer_pooling (`str`, *optional*, defaults to `"last"`):
            Which HuBERT output feeds the speech encoder: `"last"` (last hidden layer) or `"weighted_sum"` (a learned
            softmax-weighted sum of all hidden layers, as in SUPERB; lower layers carry more phonetic detail).
        speech_frame_downsample (`int`, *optional*, defaults to 2):
            Mean-pool this many consecutive HuBERT frames (20 ms each) into one speech token. Shorter sequences make the
            speech encoder and the cross-attention cheaper; padding frames are excluded from the mean.
        speech_encoder_positions (`str`, *optional*, defaults to `"none"`):
            Position information the speech encoder adds to its tokens. `"none"`: only what HuBERT's relative
            (convolutional) positions left in the frames. `"sinusoidal"`: fixed sinusoidal positions of each token's
            index (as the original transformer), added after the input projection, so every speech token knows how
            far into the clip it is: what a pooled clip needs to tell "a red square to the left of a blue circle" from
            "a blue circle to the left of a red square". No parameters, any length.
        multimodal_image_positions (`str`, *optional*, defaults to `"none"`):
            Position information added to the image tokens the multimodal encoder's cross-attention reads. `"none"`:
            only what the vision tower left in them (a pretrained ViT keeps where each patch is; cross-attention itself
            is blind to token order). `"sinusoidal"`: fixed 2D sinusoidal codes of each patch's row (first half of the
            width) and column (second half), none for the CLS token, so SIM can attend to "the left of the image". No
            parameters; needs a square patch grid.
        speech_encoder_hidden_size (`int`, *optional*, defaults to 768):
            Width of the speech encoder and of the multimodal encoder (speech tokens are the queries of the latter).
        speech_encoder_num_layers (`int`, *optional*, defaults to 2):
            Transformer layers of the speech encoder on top of HuBERT.
        speech_encoder_num_heads (`int`, *optional*, defaults to 12):
            Attention heads in the speech encoder.
        speech_encoder_intermediate_size (`int`, *optional*, defaults to 3072):
            Feed-forward width in the speech encoder.
        multimodal_num_layers (`int`, *optional*, defaults to 2):
            Layers of the multimodal encoder; each has speech self-attention, cross-attention to image patch tokens and
            a feed-forward block.
        multimodal_num_heads (`int`, *optional*, defaults to 12):
            Attention heads in the multimodal encoder.
        multimodal_intermediate_size (`int`, *optional*, defaults to 3072):
            Feed-forward width in the multimodal encoder.
        embed_dim (`int`, *optional*, defaults to 256):
            Size of the shared, L2-normalised speech-image embedding space.
        temperature_init (`float`, *optional*, defaults to 0.07):
            Initial value of the learnable SIC temperature.
        temperature_min (`float`, *optional*, defaults to 0.001):
            Lower clamp of the temperature (keeps the logits finite).
        temperature_max (`float`, *optional*, defaults to 0.5):
            Upper clamp of the temperature.
        k_test (`int`, *optional*, defaults to 128):
            How many coarse (SIC) candidates are re-ranked by the SIM head at retrieval time.
        freeze_image_backbone (`bool`, *optional*, defaults to `False`):
            A record of how the model was trained: True when the training code froze the BLIP-2 vision tower
            (`C2FSpeechImageModel.freeze_backbones`). Loading a model does not act on it.
        freeze_speech_backbone (`bool`, *optional*, defaults to `False`):
            Likewise, for all of HuBERT.
        freeze_speech_feature_encoder (`bool`, *optional*, defaults to `False`):
            Likewise, for HuBERT's convolutional feature encoder alone.
        hidden_dropout (`float`, *optional*, defaults to 0.1):
            Dropout in the speech and multimodal encoders.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the layer norms of the speech and multimodal encoders.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the feed-forward blocks.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of the new (non-backbone) weights.
    """

    model_type = "c2f"
    sub_configs_defaults = {"speech_config": HubertConfig, "vision_config": Blip2VisionConfig}

    speech_config: dict | HubertConfig | None = None
    vision_config: dict | Blip2VisionConfig | None = None
    speech_front_end: str = "waveform"
    log_mel_bins: int = 40
    log_mel_cepstral_coefficients: int = 0
    speech_frequency_warp: float = 0.0
    test_time_speeds: list[float] | tuple[float, ...] = ()
    test_time_image_shift: float = 0.0
    vision_stem: str = "patch"
    speech_layer_pooling: str = "last"
    speech_frame_downsample: int = 2
    speech_encoder_positions: str = "none"
    multimodal_image_positions: str = "none"
    speech_encoder_hidden_size: int = 768
    speech_encoder_num_layers: int = 2
    speech_encoder_num_heads: int = 12
    speech_encoder_intermediate_size: int = 3072
    multimodal_num_layers: int = 2
    multimodal_num_heads: int = 12
    multimodal_intermediate_size: int = 3072
    embed_dim: int = 256
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    k_test: int = 128
    freeze_image_backbone: bool = False
    freeze_speech_backbone: bool = False
    freeze_speech_feature_encoder: bool = False
    hidden_dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    @property
    def min_audio_samples(self) -> int:
        """The shortest 16 kHz clip that yields one speech frame through the speech config's convolution arithmetic
        (HuBERT's conv stack, or the log-mel window and its Conv1d layers)."""
        needed = 1
        for kernel, stride in reversed(list(zip(self.speech_config.conv_kernel, self.speech_config.conv_stride))):
            needed = (needed - 1) * stride + kernel
        return needed

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_values()

    def _check_values(self):
        """Reject settings that would only fail later, deep inside a forward pass."""
        if self.speech_layer_pooling not in ("last", "weighted_sum"):
            raise ValueError(
                f"C2FConfig.speech_layer_pooling must be 'last' or 'weighted_sum', got {self.speech_layer_pooling!r}"
            )
        if self.speech_front_end not in ("waveform", "log_mel"):
            raise ValueError(f"C2FConfig.speech_front_end must be 'waveform' or 'log_mel', got {self.speech_front_end!r}")
        if self.speech_front_end == "log_mel" and self.log_mel_bins < 1:
            raise ValueError(f"C2FConfig.log_mel_bins must be >= 1, got {self.log_mel_bins}")
        if self.speech_front_end == "log_mel" and self.speech_layer_pooling != "last":
            # The log-mel path runs HuBERT's encoder directly (to hand it the frame mask), which records no per-layer
            # outputs; a weighted sum of layers is for pretrained HuBERT anyway.
            raise ValueError("C2FConfig.speech_front_end='log_mel' needs speech_layer_pooling='last'")
        if not 0 <= self.log_mel_cepstral_coefficients <= self.log_mel_bins:
            raise ValueError(f"C2FConfig.log_mel_cepstral_coefficients must be in [0, log_mel_bins={self.log_mel_bins}], "
                             f"got {self.log_mel_cepstral_coefficients}")
        if not 0 <= self.speech_frequency_warp < 1:
            raise ValueError(f"C2FConfig.speech_frequency_warp must be in [0, 1), got {self.speech_frequency_warp}")
        if not all(0.5 <= speed <= 2 for speed in self.test_time_speeds):
            raise ValueError(f"C2FConfig.test_time_speeds must be speeds in [0.5, 2], got {list(self.test_time_speeds)}")
        if not 0 <= self.test_time_image_shift < 0.5:
            raise ValueError(f"C2FConfig.test_time_image_shift must be in [0, 0.5), got {self.test_time_image_shift}")
        if self.vision_stem not in ("patch", "conv"):
            raise ValueError(f"C2FConfig.vision_stem must be 'patch' or 'conv', got {self.vision_stem!r}")
        patch_size = self.vision_config.patch_size
        if self.vision_stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
            raise ValueError(f"C2FConfig.vision_stem='conv' needs a power-of-two vision patch_size, got {patch_size}")
        for name in ("speech_encoder_positions", "multimodal_image_positions"):
            if getattr(self, name) not in ("none", "sinusoidal"):
                raise ValueError(f"C2FConfig.{name} must be 'none' or 'sinusoidal', got {getattr(self, name)!r}")
        if self.speech_frame_downsample < 1:
            raise ValueError(f"C2FConfig.speech_frame_downsample must be >= 1, got {self.speech_frame_downsample}")
        for width, heads in (
            ("speech_encoder_hidden_size", "speech_encoder_num_heads"),
            ("speech_encoder_hidden_size", "multimodal_num_heads"),
        ):
            if getattr(self, width) % getattr(self, heads) != 0:
                raise ValueError(
                    f"C2FConfig.{width} ({getattr(self, width)}) must be divisible by {heads} ({getattr(self, heads)})"
                )
        if not 0 < self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ValueError(
                "C2FConfig needs 0 < temperature_min <= temperature_init <= temperature_max, got "
                f"{self.temperature_min}, {self.temperature_init}, {self.temperature_max}"
            )
        if self.embed_dim < 1 or self.k_test < 0:
            raise ValueError(f"C2FConfig needs embed_dim >= 1 and k_test >= 0, got {self.embed_dim}, {self.k_test}")


__all__ = ["C2FConfig"]
