"""PyTorch c2f: coarse-to-fine speech-image retrieval (Zhou & Li, arXiv 2408.13119).

HuBERT -> speech encoder -> speech embedding; BLIP-2 vision tower -> image embedding; both in one normalised space for
speech-image contrastive (SIC) ranking, and a multimodal transformer whose speech tokens cross-attend to image patch
tokens for speech-image matching (SIM) re-ranking.

This file is copied verbatim to a Hub repository by `save_pretrained`: it imports only torch, transformers and the
configuration file beside it. The embedding queue and the momentum model are training state and live in the trainer.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2VisionModel, HubertModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.audio_utils import mel_filter_bank
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_c2f import C2FConfig


# --------------------------------------------------------------------------------------------------------------------
# Losses: pure functions, so the trainer (queue, momentum targets, several ranks) reuses exactly the same math.
# --------------------------------------------------------------------------------------------------------------------


def same_image_mask(query_image_ids: torch.Tensor, key_image_ids: torch.Tensor) -> torch.Tensor:
    """`[num_queries, num_keys]` bool mask, True where query and key show the same image.

    Other captions of the same image are not negatives: in Flickr8k every image has five.
    """
    return query_image_ids.view(-1, 1) == key_image_ids.view(1, -1)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def sic_loss(
    speech_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    image_ids: torch.Tensor,
    temperature: torch.Tensor,
    key_speech_embeds: torch.Tensor | None = None,
    key_image_embeds: torch.Tensor | None = None,
    key_image_ids: torch.Tensor | None = None,
    soft_targets_speech_to_image: torch.Tensor | None = None,
    soft_targets_image_to_speech: torch.Tensor | None = None,
    distill_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speech-image contrastive loss (InfoNCE both ways), averaged over the two directions.

    Queries are the batch's `speech_embeds` / `image_embeds` (normalised). Keys default to the batch; a trainer passes
    the batch gathered over ranks followed by the queue. Every key with the query's image id is a positive, and the
    hard target spreads its mass evenly over them. With momentum distillation the target is
    `(1 - alpha) * hard + alpha * soft`, where the soft targets are softmaxed momentum similarities over the same keys.

    Returns `(loss, logits_speech_to_keys, logits_image_to_keys)`.
    """
    if key_speech_embeds is None:
        key_speech_embeds, key_image_embeds, key_image_ids = speech_embeds, image_embeds, image_ids
    if key_image_embeds is None or key_image_ids is None:
        raise ValueError("sic_loss: key_speech_embeds, key_image_embeds and key_image_ids must be given together")
    logits_speech_to_image = speech_embeds @ key_image_embeds.t() / temperature
    logits_image_to_speech = image_embeds @ key_speech_embeds.t() / temperature

    positives = same_image_mask(image_ids, key_image_ids).to(logits_speech_to_image.dtype)
    positives_per_query = positives.sum(dim=1, keepdim=True)
    if bool((positives_per_query == 0).any()):
        raise ValueError("sic_loss: every query needs its own pair among the keys (keys must include the batch)")
    hard_targets = positives / positives_per_query

    targets_speech_to_image = hard_targets
    targets_image_to_speech = hard_targets
    if distill_alpha > 0:
        if soft_targets_speech_to_image is None or soft_targets_image_to_speech is None:
            raise ValueError("sic_loss: distill_alpha > 0 needs soft targets for both directions")
        targets_speech_to_image = (1 - distill_alpha) * hard_targets + distill_alpha * soft_targets_speech_to_image
        targets_image_to_speech = (1 - distill_alpha) * hard_targets + distill_alpha * soft_targets_image_to_speech

    loss = (
        _soft_cross_entropy(logits_speech_to_image, targets_speech_to_image)
        + _soft_cross_entropy(logits_image_to_speech, targets_image_to_speech)
    ) / 2
    return loss, logits_speech_to_image, logits_image_to_speech


def sample_hard_negatives(
    logits: torch.Tensor, positive_mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each query row, sample one key with probability softmax(logits), positives excluded (ALBEF's mining).

    Returns key indices, `-1` for rows where every key is a positive (no negative exists in the batch).
    """
    with torch.no_grad():
        weights = F.softmax(logits.float(), dim=1).masked_fill(positive_mask, 0.0)
        has_negative = (~positive_mask).any(dim=1)
        # Uniform fallback where the softmax underflowed to zero on every negative.
        underflow = has_negative & (weights.sum(dim=1) == 0)
        weights[underflow] = (~positive_mask[underflow]).float()
        weights[~has_negative] = 1.0  # any valid row for multinomial; replaced by -1 below
        picked = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return torch.where(has_negative, picked, torch.full_like(picked, -1))


def sim_loss(match_logits: torch.Tensor, match_labels: torch.Tensor) -> torch.Tensor:
    """Speech-image matching loss: 2-way cross-entropy (index 1 = match) over positives and hard negatives."""
    return F.cross_entropy(match_logits, match_labels)


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class C2FSpeechOutput(ModelOutput):
    """Speech side of the model.

    Args:
        speech_embeds: `[batch, embed_dim]` projected speech embedding (normalised unless asked otherwise).
        speech_tokens: `[batch, 1 + tokens, hidden]` speech-encoder output; position 0 is the CLS token. These are
            the queries of the multimodal (SIM) encoder.
        speech_token_mask: `[batch, 1 + tokens]` bool, False at padding.
    """

    speech_embeds: torch.Tensor | None = None
    speech_tokens: torch.Tensor | None = None
    speech_token_mask: torch.Tensor | None = None


@dataclass
class C2FImageOutput(ModelOutput):
    """Image side of the model.

    Args:
        image_embeds: `[batch, embed_dim]` projected image embedding (normalised unless asked otherwise).
        image_tokens: `[batch, 1 + patches, vision_hidden]` last hidden state of the BLIP-2 vision tower (CLS first);
            the keys/values of the SIM cross-attention. This is what a frozen-backbone feature cache stores.
    """

    image_embeds: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None


@dataclass
class C2FRerankOutput(ModelOutput):
    """Output of [`C2FSpeechImageModel.rerank`], the one coarse-to-fine ranking that evaluation, the pipeline and the
    index all use.

    Args:
        order: `[queries, candidates]` candidate columns, best first: the top `k` by cosine in the order of their fine
            score, then every other candidate in cosine order.
        coarse_scores: `[queries, candidates]` SIC cosines.
        fine_scores: `[queries, candidates]` SIM logit margin + cosine / temperature for the re-scored pairs, NaN for
            the others (their place is given by `order`, not by a made-up score).
        match_scores: `[queries, candidates]` SIM match probability of the re-scored pairs, NaN for the others.
        reranked: `[queries, candidates]` bool, True where the SIM head scored the pair.
    """

    order: torch.Tensor | None = None
    coarse_scores: torch.Tensor | None = None
    fine_scores: torch.Tensor | None = None
    match_scores: torch.Tensor | None = None
    reranked: torch.Tensor | None = None

    def results(self, row: int, top_k: int) -> list[dict]:
        """The best `top_k` of query `row` as `{"index", "score", "coarse_score", "match_score"?}` dicts, best first.
        `score` is the fine score where the SIM head scored the pair and the cosine below the re-scored ones."""
        results = []
        for column in self.order[row, :top_k].tolist():
            result = {"index": column, "coarse_score": float(self.coarse_scores[row, column])}
            if self.reranked[row, column]:
                result["score"] = float(self.fine_scores[row, column])
                result["match_score"] = float(self.match_scores[row, column])
            else:
                result["score"] = result["coarse_score"]
            results.append(result)
        return results


@dataclass
class C2FOutput(ModelOutput):
    """Output of [`C2FSpeechImageModel.forward`].

    There is no combined `loss`: the two are weighted, and SIC's keys extended, by the training code.

    Args:
        loss_sic: in-batch speech-image contrastive loss, when `return_loss=True`.
        loss_sim: speech-image matching loss over the positives and the mined hard negatives.
        logits_per_speech: `[batch, batch]` in-batch speech-to-image similarities divided by the temperature.
        logits_per_image: its transpose.
        speech_embeds / image_embeds: normalised embeddings `[batch, embed_dim]`.
        match_logits / match_labels: SIM head logits `[pairs, 2]` and labels (1 = match) used for `loss_sim`.
        temperature: the clamped temperature used for the logits.
        speech_output / image_output: the per-modality outputs, tokens included.
    """

    loss_sic: torch.Tensor | None = None
    loss_sim: torch.Tensor | None = None
    logits_per_speech: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    speech_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    match_logits: torch.Tensor | None = None
    match_labels: torch.Tensor | None = None
    temperature: torch.Tensor | None = None
    speech_output: C2FSpeechOutput | None = None
    image_output: C2FImageOutput | None = None


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------


class C2FAttention(nn.Module):
    """Multi-head attention whose keys/values may come from another modality of another width."""

    def __init__(self, hidden_size: int, num_heads: int, key_value_size: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(key_value_size, hidden_size)
        self.v_proj = nn.Linear(key_value_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, key_value_states: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        query = self._split_heads(self.q_proj(hidden_states))
        key = self._split_heads(self.k_proj(key_value_states))
        value = self._split_heads(self.v_proj(key_value_states))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        batch, _, length, _ = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class C2FFeedForward(nn.Module):
    def __init__(self, config: C2FConfig, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(config.speech_encoder_hidden_size, intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, config.speech_encoder_hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class C2FEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer over speech tokens; with `cross_attention_size` it also attends to image tokens.

    We write our own rather than `BertModel(add_cross_attention=True)`, which transformers 5 turns into a causal
    decoder.
    """

    def __init__(self, config: C2FConfig, num_heads: int, intermediate_size: int, cross_attention_size: int | None):
        super().__init__()
        hidden, eps, dropout = config.speech_encoder_hidden_size, config.layer_norm_eps, config.hidden_dropout
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = C2FAttention(hidden, num_heads, hidden, dropout)
        self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps) if cross_attention_size else None
        self.cross_attn = C2FAttention(hidden, num_heads, cross_attention_size, dropout) if cross_attention_size else None
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = C2FFeedForward(config, intermediate_size)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.self_attn_norm(hidden_states)
        hidden_states = hidden_states + self.dropout(self.self_attn(normed, normed, token_mask))
        if self.cross_attn is not None:
            if image_tokens is None:
                raise ValueError("a cross-attention layer needs image_tokens")
            normed = self.cross_attn_norm(hidden_states)
            hidden_states = hidden_states + self.dropout(self.cross_attn(normed, image_tokens))
        return hidden_states + self.dropout(self.ffn(self.ffn_norm(hidden_states)))


def downsample_frames(frames: torch.Tensor, frame_mask: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pool every `factor` frames, ignoring padding; a pooled token is valid if any of its frames is."""
    if factor == 1:
        return frames, frame_mask
    batch, length, hidden = frames.shape
    pad = (-length) % factor
    if pad:
        frames = F.pad(frames, (0, 0, 0, pad))
        frame_mask = F.pad(frame_mask, (0, pad), value=False)
    weights = frame_mask.to(frames.dtype).view(batch, -1, factor, 1)
    summed = (frames.view(batch, -1, factor, hidden) * weights).sum(dim=2)
    counts = weights.sum(dim=2)
    return summed / counts.clamp(min=1), counts.squeeze(-1) > 0


def sinusoidal_positions(length: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """`[length, width]` fixed sinusoidal position codes (Vaswani et al. 2017): sines in the first half of the
    width, cosines in the second, wavelengths from 2 pi to 10000 * 2 pi tokens."""
    half = width // 2
    frequencies = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1) * frequencies
    codes = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(codes, (0, width - 2 * half)).to(dtype)


def image_grid_positions(num_tokens: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """`[num_tokens, width]` codes for a ViT's tokens (CLS, then a square grid of patches row by row): zeros for CLS,
    then each patch's row as sinusoidal codes in the first half of the width and its column in the second."""
    side = math.isqrt(num_tokens - 1)
    if side * side != num_tokens - 1:
        raise ValueError(f"multimodal_image_positions needs CLS + a square patch grid; got {num_tokens} image tokens")
    rows = sinusoidal_positions(side, width // 2, device, torch.float32)
    columns = sinusoidal_positions(side, width - width // 2, device, torch.float32)
    grid = torch.cat([rows[:, None].expand(-1, side, -1), columns[None].expand(side, -1, -1)], dim=-1)
    return F.pad(grid.reshape(side * side, width), (0, 0, 1, 0)).to(dtype)


def shift_images(pixel_values: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """`[batch, channels, height, width]` moved by whole pixels, the border pixels repeated into the gap: the image
    shift of training (`ImageAugmentation`) and of test-time views alike. No flips: captions name left and right."""
    if down == 0 and right == 0:
        return pixel_values
    height, width = pixel_values.shape[-2:]
    pad = max(abs(down), abs(right))
    padded = F.pad(pixel_values, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - down : pad - down + height, pad - right : pad - right + width]


def change_speed(
    input_values: torch.Tensor, attention_mask: torch.Tensor | None, speed: float, min_samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip of a padded batch played `speed` times as fast: 1/speed as long, pitch and formants times speed (the
    training speed perturbation, as a test-time view). Linear interpolation over each clip's own samples, so padding
    never enters; no clip is made shorter than `min_samples`. Returns the new padded batch and its mask."""
    lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [input_values.shape[1]] * len(input_values)
    clips = [
        F.interpolate(input_values[row, : int(length)].view(1, 1, -1), size=max(round(length / speed), min_samples),
                      mode="linear", align_corners=False).view(-1)
        for row, length in enumerate(lengths)
    ]
    longest = max(len(clip) for clip in clips)
    values = torch.stack([F.pad(clip, (0, longest - len(clip))) for clip in clips])
    mask = torch.arange(longest, device=values.device) < torch.tensor([len(clip) for clip in clips], device=values.device).unsqueeze(1)
    return values, mask.long()


def mean_of_views(views: list[torch.Tensor]) -> torch.Tensor:
    """The mean of `[batch, dim]` embeddings of several views, each made unit length first, so no view weighs more
    for its norm."""
    return torch.stack([F.normalize(view, dim=-1) for view in views]).mean(dim=0)


def cepstral_smoothing_matrix(bins: int, coefficients: int) -> np.ndarray | None:
    """`[bins, bins]` projection of a log-mel frame onto its first `coefficients` DCT-II (cepstral) components, back in
    mel bands: classical MFCC liftering, which drops the pitch harmonics a voice leaves in the log-mel. None when it
    would keep everything."""
    if coefficients in (0, bins):
        return None
    band = np.arange(bins) + 0.5
    dct = np.sqrt(2.0 / bins) * np.cos(np.pi * np.arange(coefficients)[:, None] * band[None, :] / bins)
    dct[0] /= np.sqrt(2.0)  # orthonormal rows, so dct.T @ dct is a projection
    return (dct.T @ dct).astype("float32")


class C2FLogMelFeatureEncoder(nn.Module):
    """A log-mel front end that takes the place of HuBERT's waveform convolutions (`speech_front_end="log_mel"`).

    Why: trained from random weights on the demo, HuBERT's waveform conv stack memorises the training voices; this
    front end, feeding HuBERT's own feature projection and encoder, lifted held-out test S->I R@1 from 6.5 to 25.6 at
    equal steps in a probe. The STFT plays the part of HuBERT's first conv layer (window `conv_kernel[0]`, hop
    `conv_stride[0]`) and the other layers are `Conv1d` with the config's kernels, strides and widths, so HuBERT's own
    length arithmetic (`_get_feat_extract_output_lengths`) counts the frames. Unpadded convolutions and statistics over
    valid frames only keep a clip's features independent of the padding its batch adds.
    """

    sampling_rate = 16000  # HuBERT's rate; the processor resamples everything to it

    def __init__(self, config: C2FConfig):
        super().__init__()
        speech_config = config.speech_config
        self.window_length, self.hop_length = speech_config.conv_kernel[0], speech_config.conv_stride[0]
        self.fft_length = self.window_length  # no zero padding: 2.6x faster than a 512-point FFT for 400 samples
        self.frequency_warp = config.speech_frequency_warp
        # A plain array, not a buffer: from_pretrained builds modules on the meta device and would leave it empty.
        self._mel_filters = mel_filter_bank(
            num_frequency_bins=self.fft_length // 2 + 1,
            num_mel_filters=config.log_mel_bins,
            min_frequency=20.0,
            max_frequency=self.sampling_rate / 2,
            sampling_rate=self.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        ).astype("float32")
        self._cepstral_smoothing = cepstral_smoothing_matrix(config.log_mel_bins, config.log_mel_cepstral_coefficients)
        widths = (config.log_mel_bins, *speech_config.conv_dim[1:])
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(widths[i], widths[i + 1], speech_config.conv_kernel[i + 1], speech_config.conv_stride[i + 1])
            for i in range(len(widths) - 1)
        )
        self.activation = ACT2FN[speech_config.feat_extract_activation]

    def _warped_filters(self, filters: torch.Tensor, batch: int) -> torch.Tensor:
        """`[batch, bins, mel]` filter banks that read each clip's spectrum stretched along frequency by a random factor
        (linear interpolation between bins): warping the filters instead of the spectrum gives the same log-mel, and
        costs a `[bins, mel]` scatter per clip rather than a gather over every frame (a third of the front end's time).
        """
        bins = filters.shape[0]
        factors = 1 + self.frequency_warp * (2 * torch.rand(batch, 1, device=filters.device) - 1)
        source = (torch.arange(bins, device=filters.device).float() / factors).clamp(max=bins - 1)
        lower = source.floor().long()
        upper = (lower + 1).clamp(max=bins - 1)
        weight = (source - lower).unsqueeze(-1).to(filters.dtype)
        # Warped bin k reads source bins lower[k] and upper[k]; so source bin j feeds mel band m through every k
        # that reads it: the transpose of the interpolation applied to the filters.
        warped = filters.new_zeros(batch, bins, filters.shape[1])
        expand = lambda index: index.unsqueeze(-1).expand(-1, -1, filters.shape[1])
        warped.scatter_add_(1, expand(lower), filters * (1 - weight))
        warped.scatter_add_(1, expand(upper), filters * weight)
        return warped

    def log_mel(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """`[batch, frames, mel bins]` log-mel features, normalised per clip over its own frames, and the frame mask."""
        if input_values.shape[1] < self.window_length:  # a clip shorter than one window still gets one frame
            input_values = F.pad(input_values, (0, self.window_length - input_values.shape[1]))
        frames = input_values.unfold(1, self.window_length, self.hop_length)
        window = torch.hann_window(self.window_length, device=frames.device, dtype=frames.dtype)
        spectrum = torch.fft.rfft(frames * window, n=self.fft_length)
        power = spectrum.real.square() + spectrum.imag.square()
        filters = torch.from_numpy(self._mel_filters).to(device=power.device, dtype=power.dtype)
        if self.training and self.frequency_warp > 0:
            filters = self._warped_filters(filters, power.shape[0])
        log_mel = torch.log(power @ filters + 1e-6)
        if self._cepstral_smoothing is not None:
            log_mel = log_mel @ torch.from_numpy(self._cepstral_smoothing).to(device=log_mel.device, dtype=log_mel.dtype)
        num_frames = log_mel.shape[1]
        if attention_mask is None:
            frame_mask = torch.ones(log_mel.shape[:2], dtype=torch.bool, device=log_mel.device)
        else:
            lengths = attention_mask.sum(dim=1)
            valid = torch.div(lengths - self.window_length, self.hop_length, rounding_mode="floor") + 1
            frame_mask = torch.arange(num_frames, device=log_mel.device) < valid.clamp(min=1).unsqueeze(1)
        weights = frame_mask.unsqueeze(-1).to(log_mel.dtype)
        count = weights.sum(dim=1, keepdim=True)
        mean = (log_mel * weights).sum(dim=1, keepdim=True) / count
        variance = ((log_mel - mean).square() * weights).sum(dim=1, keepdim=True) / count
        normalised = (log_mel - mean) / (variance + 1e-5).sqrt()
        return normalised * weights, frame_mask

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[batch, conv_dim[-1], frames]`, the shape of HuBERT's `feature_extractor` output."""
        hidden_states = self.log_mel(input_values, attention_mask)[0].transpose(1, 2)
        for conv in self.conv_layers:
            hidden_states = self.activation(conv(hidden_states))
        return hidden_states


class C2FConvStem(nn.Module):
    """Stride-2 3x3 convolutions down to the patch grid, then a 1x1 projection: replaces BLIP-2's patch embedding when
    `vision_stem="conv"`.

    Why: a ViT trained from scratch on a few hundred images learns slowly from a single strided patch convolution;
    early convolutions help (Xiao et al. 2021, "Early convolutions help transformers see better"). In a probe on the
    demo, a small CNN image tower beat the ViT by 10 validation points.
    """

    def __init__(self, vision_config):
        super().__init__()
        steps = vision_config.patch_size.bit_length() - 1
        hidden = vision_config.hidden_size
        widths = [3] + [max(8, hidden >> (steps - step)) for step in range(1, steps + 1)]
        self.layers = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(steps))
        self.activation = nn.GELU()
        self.projection = nn.Conv2d(widths[-1], hidden, 1)

    @property
    def weight(self) -> torch.Tensor:
        """BLIP-2's embeddings read `patch_embedding.weight.dtype` to cast the pixels."""
        return self.projection.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = pixel_values
        for layer in self.layers:
            hidden_states = self.activation(layer(hidden_states))
        return self.projection(hidden_states)


class C2FSpeechEncoder(nn.Module):
    """Turns HuBERT frames into speech tokens: downsample, project, prepend CLS, a few transformer layers."""

    def __init__(self, config: C2FConfig):
        super().__init__()
        hidden = config.speech_encoder_hidden_size
        self.downsample = config.speech_frame_downsample
        self.add_positions = config.speech_encoder_positions == "sinusoidal"
        self.input_projection = nn.Linear(config.speech_config.hidden_size, hidden)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.layers = nn.ModuleList(
            C2FEncoderLayer(config, config.speech_encoder_num_heads, config.speech_encoder_intermediate_size, None)
            for _ in range(config.speech_encoder_num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames, frame_mask = downsample_frames(frames, frame_mask, self.downsample)
        tokens = self.input_projection(frames)
        if self.add_positions:
            tokens = tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[2], tokens.device, tokens.dtype)
        batch = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        token_mask = torch.cat([frame_mask.new_ones(batch, 1), frame_mask], dim=1)
        for layer in self.layers:
            tokens = layer(tokens, token_mask)
        return self.final_norm(tokens), token_mask


class C2FMultimodalEncoder(nn.Module):
    """Speech tokens self-attend and cross-attend to image patch tokens; the CLS output feeds the SIM head."""

    def __init__(self, config: C2FConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            C2FEncoderLayer(
                config,
                config.multimodal_num_heads,
                config.multimodal_intermediate_size,
                cross_attention_size=config.vision_config.hidden_size,
            )
            for _ in range(config.multimodal_num_layers)
        )
        self.final_norm = nn.LayerNorm(config.speech_encoder_hidden_size, eps=config.layer_norm_eps)
        self.add_image_positions = config.multimodal_image_positions == "sinusoidal"

    def forward(
        self, speech_tokens: torch.Tensor, speech_token_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        if self.add_image_positions:
            image_tokens = image_tokens + image_grid_positions(*image_tokens.shape[1:], image_tokens.device, image_tokens.dtype)
        hidden_states = speech_tokens
        for layer in self.layers:
            hidden_states = layer(hidden_states, speech_token_mask, image_tokens)
        return self.final_norm(hidden_states)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class C2FPreTrainedModel(PreTrainedModel):
    config: C2FConfig
    config_class = C2FConfig
    base_model_prefix = "c2f"
    main_input_name = "input_values"
    input_modalities = ("audio", "image")
    supports_gradient_checkpointing = True
    _no_split_modules = ["C2FEncoderLayer", "HubertEncoderLayer", "Blip2EncoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, C2FSpeechEncoder):
            init.normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, C2FSpeechImageModel):
            init.constant_(module.temperature, self.config.temperature_init)
            if module.speech_layer_weights is not None:
                init.zeros_(module.speech_layer_weights)


class C2FSpeechImageModel(C2FPreTrainedModel):
    """Coarse-to-fine speech-image model: SIC embeddings for ranking, a SIM head for re-ranking.

    Use `get_speech_features` / `get_image_features` for retrieval embeddings, `match_scores` for the fine score of
    given pairs, and `forward(..., return_loss=True)` to train on a batch of paired speech and images.
    """

    # Inference with a group-norm HuBERT (hubert-base) runs each clip at its own length, so padding cannot change an
    # embedding. A trainer's momentum copy turns it off: it must see batches the way the online model does.
    unpadded_speech_inference: bool = True
    # Inference averages the config's test-time views (`test_time_speeds`, `test_time_image_shift`). A trainer's
    # momentum copy turns it off: its features and targets stand for the one view training sees.
    test_time_views: bool = True

    def __init__(self, config: C2FConfig):
        super().__init__(config)
        self.speech_model = HubertModel(config.speech_config)
        if config.speech_front_end == "log_mel":
            self.speech_model.feature_extractor = C2FLogMelFeatureEncoder(config)
        self.vision_model = Blip2VisionModel(config.vision_config)
        if config.vision_stem == "conv":
            self.vision_model.embeddings.patch_embedding = C2FConvStem(config.vision_config)
        self.speech_layer_weights = (
            nn.Parameter(torch.zeros(config.speech_config.num_hidden_layers + 1))
            if config.speech_layer_pooling == "weighted_sum"
            else None
        )
        self.speech_encoder = C2FSpeechEncoder(config)
        self.multimodal_encoder = C2FMultimodalEncoder(config)
        self.speech_projection = nn.Linear(config.speech_encoder_hidden_size, config.embed_dim)
        self.image_projection = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.match_head = nn.Linear(config.speech_encoder_hidden_size, 2)
        self.temperature = nn.Parameter(torch.tensor(config.temperature_init))
        self.frozen_modules: set[str] = set()  # backbones `freeze_backbones` froze: kept in eval mode
        self.post_init()

    # ---------------------------------------------------------------- construction

    def freeze_backbones(self, image: bool = False, speech: bool = False, speech_feature_encoder: bool = False):
        """Stop training the named backbones, as the training code decides (like open_clip's `lock_image_tower`):
        their parameters get no gradients, and they stay in eval mode through `train()`, so that dropout or
        SpecAugment cannot move the features a feature cache stores. `speech_feature_encoder` freezes HuBERT's
        convolutional front end alone (the usual choice when fine-tuning HuBERT). The config records what was frozen,
        as a note of how the model was trained; `from_pretrained` does not act on it. Returns the model."""
        if image:
            self.vision_model.requires_grad_(False)
            self.frozen_modules.add("vision_model")
        if speech:
            self.speech_model.requires_grad_(False)
            self.frozen_modules.add("speech_model")
        elif speech_feature_encoder:
            self.speech_model.feature_extractor.requires_grad_(False)
        speech_frozen = "speech_model" in self.frozen_modules
        self.config.freeze_image_backbone = "vision_model" in self.frozen_modules
        self.config.freeze_speech_backbone = speech_frozen
        self.config.freeze_speech_feature_encoder = not speech_frozen and not any(
            parameter.requires_grad for parameter in self.speech_model.feature_extractor.parameters())
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
        return self

    @classmethod
    def from_backbones(
        cls, speech_model_name_or_path: str, image_model_name_or_path: str, **config_overrides
    ) -> "C2FSpeechImageModel":
        """Build a model around pretrained HuBERT weights and the vision tower of a BLIP-2 checkpoint.

        `image_model_name_or_path` may be a full `Blip2Model` / `Blip2ForConditionalGeneration` checkpoint or a
        standalone `Blip2VisionModel`; only the vision tower is kept. The new layers are randomly initialised, and
        nothing is frozen: that is the training code's call (`freeze_backbones`).
        Raises if any backbone weight is missing from the checkpoint, instead of silently training from random.
        """
        speech_model, speech_info = HubertModel.from_pretrained(speech_model_name_or_path, output_loading_info=True)
        # Both layouts store the tower under `vision_model.`; the standalone class expects no prefix.
        vision_model, vision_info = Blip2VisionModel.from_pretrained(
            image_model_name_or_path, key_mapping={r"^vision_model\.": ""}, output_loading_info=True
        )
        for name, info in ((speech_model_name_or_path, speech_info), (image_model_name_or_path, vision_info)):
            if info["missing_keys"] or info["mismatched_keys"]:
                missing = sorted(info["missing_keys"]) + [str(key) for key in info["mismatched_keys"]]
                raise ValueError(
                    f"{name}: {len(missing)} backbone weights were not found or had the wrong shape "
                    f"(first: {missing[:5]}); expected a HuBERT or BLIP-2 checkpoint"
                )
        config = C2FConfig(
            speech_config=speech_model.config.to_dict(),
            vision_config=vision_model.config.to_dict(),
            **config_overrides,
        )
        model = cls(config)
        model.speech_model.load_state_dict(speech_model.state_dict())
        model.vision_model.load_state_dict(vision_model.state_dict())
        return model

    # ---------------------------------------------------------------- encoders

    def _check_clip_lengths(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """A clip shorter than one frame's receptive field would crash the convolutions alone, and in a batch would be
        read through its padding (a 1-sample clip once ranked first in an audio index)."""
        lengths = attention_mask.sum(dim=1) if attention_mask is not None else torch.tensor([input_values.shape[1]])
        needed = self.config.min_audio_samples
        short = (lengths < needed).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"speech clip {short[0]} has {int(lengths[short[0]])} samples ({len(short)} clip(s) too short); this "
                f"model needs at least {needed} samples at 16 kHz ({1000 * needed / 16000:.0f} ms) per clip"
            )

    def speech_frames(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None):
        """The speech backbone's frames `[batch, frames, hidden]` and their bool mask: what the speech encoder reads,
        and what a frozen backbone's feature cache stores."""
        self._check_clip_lengths(input_values, attention_mask)
        speech_model = self.speech_model
        weighted = self.speech_layer_weights is not None
        if self.config.speech_front_end == "log_mel":
            # Our own front end sees the mask, so the whole path ignores padding: HuBERT's encoder zeroes padded frames
            # and masks them out of attention when it gets a (bool) frame mask.
            features = speech_model.feature_extractor(input_values, attention_mask).transpose(1, 2)
            frame_mask = self._frame_mask(features, attention_mask)
            hidden_states = speech_model._mask_hidden_states(speech_model.feature_projection(features))
            outputs = speech_model.encoder(hidden_states, attention_mask=frame_mask)
        elif speech_model.config.feat_extract_norm == "layer":
            outputs = speech_model(input_values, attention_mask=attention_mask, output_hidden_states=weighted)
        elif self.training or attention_mask is None or not self.unpadded_speech_inference:
            # HuBERT variants with group norm in the feature encoder were pretrained on zero-padded audio without a
            # mask, and train that way here; the mask still tells our own pooling which frames are padding.
            outputs = speech_model(input_values, output_hidden_states=weighted)
        else:
            # At inference padding would reach their GroupNorm statistics, positional convolution and attention, so a
            # clip's embedding would depend on its batch neighbours (cosine 0.91-0.95 measured against the clip
            # alone): each clip runs through HuBERT at its own length, exact at the cost of batching.
            return self._frames_clip_by_clip(input_values, attention_mask)
        frames = self._pool_layers(outputs, weighted)
        if self.config.speech_front_end != "log_mel":
            frame_mask = self._frame_mask(frames, attention_mask)
        return frames, frame_mask

    def _pool_layers(self, outputs, weighted: bool) -> torch.Tensor:
        if not weighted:
            return outputs.last_hidden_state
        layer_weights = F.softmax(self.speech_layer_weights, dim=0)
        return (torch.stack(outputs.hidden_states, dim=0) * layer_weights.view(-1, 1, 1, 1)).sum(dim=0)

    def _frames_clip_by_clip(self, input_values: torch.Tensor, attention_mask: torch.Tensor):
        weighted = self.speech_layer_weights is not None
        lengths = attention_mask.sum(dim=1).tolist()
        clips = [
            self._pool_layers(self.speech_model(input_values[row : row + 1, : max(1, int(length))],
                                                output_hidden_states=weighted), weighted)
            for row, length in enumerate(lengths)
        ]
        num_frames = int(self.speech_model._get_feat_extract_output_lengths(torch.tensor(input_values.shape[1])))
        frames = torch.stack([F.pad(clip[0], (0, 0, 0, num_frames - clip.shape[1])) for clip in clips])
        return frames, self._frame_mask(frames, attention_mask)

    def _frame_mask(self, frames: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`[batch, frames]` bool for `frames` `[batch, frames, hidden]`, from HuBERT's own length arithmetic."""
        if attention_mask is None:
            return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
        return self.speech_model._get_feature_vector_attention_mask(frames.shape[1], attention_mask).bool()

    def encode_speech(
        self,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
        speech_hidden_states: torch.Tensor | None = None,
        speech_frame_mask: torch.Tensor | None = None,
        average_views: bool = True,
    ) -> C2FSpeechOutput:
        """Speech embeddings plus the speech tokens the SIM head needs.

        `speech_hidden_states` (`[batch, frames, hidden]` backbone frames, e.g. from a frozen HuBERT's feature cache,
        with `speech_frame_mask` marking real frames) skips the backbone. In eval mode the embedding averages the
        config's `test_time_speeds` views of `input_values` (hidden states are one view); `average_views=False` skips
        them, for callers that need the tokens only.
        """
        if speech_hidden_states is not None:
            frames = speech_hidden_states
            frame_mask = (speech_frame_mask.bool() if speech_frame_mask is not None
                          else torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device))
        elif input_values is None:
            raise ValueError("encode_speech needs input_values or speech_hidden_states")
        else:
            frames, frame_mask = self.speech_frames(input_values, attention_mask)
        speech_tokens, speech_token_mask = self.speech_encoder(frames, frame_mask)
        speech_embeds = self.speech_projection(speech_tokens[:, 0])
        speeds = self.config.test_time_speeds if average_views and self._averages_views() and speech_hidden_states is None else ()
        if speeds:
            views = (change_speed(input_values, attention_mask, speed, self.config.min_audio_samples) for speed in speeds)
            speech_embeds = mean_of_views([speech_embeds] + [
                self.speech_projection(self.speech_encoder(*self.speech_frames(*view))[0][:, 0]) for view in views
            ])
        if normalize:
            speech_embeds = F.normalize(speech_embeds, dim=-1)
        return C2FSpeechOutput(
            speech_embeds=speech_embeds, speech_tokens=speech_tokens, speech_token_mask=speech_token_mask
        )

    def encode_image(
        self,
        pixel_values: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | None = None,
        normalize: bool = True,
        average_views: bool = True,
    ) -> C2FImageOutput:
        """Image embeddings plus the patch tokens the SIM head needs.

        `image_hidden_states` (the vision tower's last hidden state, e.g. from a feature cache) skips the tower. In eval
        mode the embedding averages the `test_time_image_shift` views of `pixel_values` (hidden states are one view);
        `average_views=False` skips them, for callers that need the tokens only.
        """
        if image_hidden_states is None:
            if pixel_values is None:
                raise ValueError("encode_image needs pixel_values or image_hidden_states")
            image_hidden_states = self.vision_model(pixel_values=pixel_values).last_hidden_state
            views = self.image_views(pixel_values) if average_views else []
        else:
            views = []
        image_embeds = self.image_projection(image_hidden_states[:, 0])
        if views:
            image_embeds = mean_of_views([image_embeds] + [
                self.image_projection(self.vision_model(pixel_values=view).last_hidden_state[:, 0]) for view in views
            ])
        if normalize:
            image_embeds = F.normalize(image_embeds, dim=-1)
        return C2FImageOutput(image_embeds=image_embeds, image_tokens=image_hidden_states)

    def _averages_views(self) -> bool:
        return self.test_time_views and not self.training

    def image_views(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The test-time copies of `pixel_values` whose embeddings inference averages with the image's own (none in
        training, or with `test_time_image_shift` 0)."""
        shift = round(self.config.test_time_image_shift * max(pixel_values.shape[-2:])) if self._averages_views() else 0
        if shift == 0:
            return []
        return [shift_images(pixel_values, down, right) for down, right in ((shift, 0), (-shift, 0), (0, shift), (0, -shift))]

    def get_speech_features(
        self,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
        speech_hidden_states: torch.Tensor | None = None,
        speech_frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[batch, embed_dim]` speech embeddings for retrieval."""
        return self.encode_speech(input_values, attention_mask, normalize, speech_hidden_states, speech_frame_mask).speech_embeds

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        normalize: bool = True,
        image_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[batch, embed_dim]` image embeddings for retrieval."""
        return self.encode_image(pixel_values, image_hidden_states, normalize=normalize).image_embeds

    def get_temperature(self) -> torch.Tensor:
        return self.temperature.clamp(self.config.temperature_min, self.config.temperature_max)

    # ---------------------------------------------------------------- matching (SIM)

    def match_logits(
        self, speech_tokens: torch.Tensor, speech_token_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """`[pairs, 2]` SIM logits (index 1 = match) for row-aligned speech and image token sequences."""
        fused = self.multimodal_encoder(speech_tokens, speech_token_mask, image_tokens)
        return self.match_head(fused[:, 0])

    def match_scores(
        self,
        input_values: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | None = None,
        speech_output: C2FSpeechOutput | None = None,
        image_output: C2FImageOutput | None = None,
    ) -> torch.Tensor:
        """`[pairs]` match probabilities for row-aligned speech-image pairs.

        Pass raw inputs, or outputs of `encode_speech` / `encode_image` to reuse tokens already computed.
        """
        # SIM reads the tokens of one view: the test-time views' embeddings would be computed for nothing.
        if speech_output is None:
            speech_output = self.encode_speech(input_values, attention_mask, average_views=False)
        if image_output is None:
            image_output = self.encode_image(pixel_values, image_hidden_states, average_views=False)
        logits = self.match_logits(
            speech_output.speech_tokens, speech_output.speech_token_mask, image_output.image_tokens
        )
        return logits.softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def rerank(
        self,
        coarse_scores: torch.Tensor,
        speech_tokens: torch.Tensor,
        speech_token_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        k: int,
        queries_are_speech: bool = True,
        batch_size: int = 64,
    ) -> C2FRerankOutput:
        """Coarse-to-fine ranking: each row's top-`k` candidates by `coarse_scores` (cosines) are re-scored by SIM logit
        margin + SIC logit (cosine / temperature), two log-odds the model was trained to produce, and ranked by it
        above all others, which keep their coarse order. (BLIP adds the raw cosine instead: on the demo's
        held-out-voice validation split that let a weak SIM head override the ranking, S->I R@1 31.2 against 45.4.)

        `coarse_scores` is `[queries, candidates]`; token tensors are indexed by speech row / image row, so for
        image queries (`queries_are_speech=False`) rows index images and columns index speech. Ties keep column order,
        so with columns already in coarse order only the first `k` candidates' tokens are ever read.
        """
        coarse = coarse_scores.float()
        coarse_order = coarse.argsort(dim=1, descending=True, stable=True)
        k = min(k, coarse.shape[1])
        fine = torch.full_like(coarse, float("nan"))
        match = torch.full_like(coarse, float("nan"))
        reranked = torch.zeros_like(coarse, dtype=torch.bool)
        if k == 0:
            return C2FRerankOutput(order=coarse_order, coarse_scores=coarse, fine_scores=fine, match_scores=match,
                                   reranked=reranked)
        top = coarse_order[:, :k]
        rows = torch.arange(coarse.shape[0], device=coarse.device).repeat_interleave(k)
        cols = top.reshape(-1)
        speech_index, image_index = (rows, cols) if queries_are_speech else (cols, rows)
        margins = []
        for start in range(0, len(rows), batch_size):
            s, i = speech_index[start : start + batch_size], image_index[start : start + batch_size]
            logits = self.match_logits(speech_tokens[s], speech_token_mask[s], image_tokens[i])
            margins.append((logits[:, 1] - logits[:, 0]).float())
        margins = torch.cat(margins)
        fine[rows, cols] = margins + coarse[rows, cols] / self.get_temperature().float()
        match[rows, cols] = torch.sigmoid(margins)  # = softmax(logits)[:, 1]
        reranked[rows, cols] = True
        by_fine = top.gather(1, fine.gather(1, top).argsort(dim=1, descending=True, stable=True))
        order = torch.cat([by_fine, coarse_order[:, k:]], dim=1)
        return C2FRerankOutput(order=order, coarse_scores=coarse, fine_scores=fine, match_scores=match, reranked=reranked)

    def _sim_loss_with_hard_negatives(
        self,
        speech_output: C2FSpeechOutput,
        image_output: C2FImageOutput,
        logits_per_speech: torch.Tensor,
        image_ids: torch.Tensor,
        extra_images: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positives = same_image_mask(image_ids, image_ids)
        # Each clip's negative image is drawn from the batch's images and any `extra_images`, by the same similarity.
        image_tokens, candidate_ids, speech_to_candidates = image_output.image_tokens, image_ids, logits_per_speech
        if extra_images is not None:
            extra_tokens, extra_embeds, extra_ids = extra_images
            image_tokens = torch.cat([image_tokens, extra_tokens.to(image_tokens.dtype)])
            candidate_ids = torch.cat([image_ids, extra_ids.to(image_ids.device)])
            extra_logits = speech_output.speech_embeds.detach() @ extra_embeds.to(logits_per_speech.dtype).t()
            speech_to_candidates = torch.cat([logits_per_speech, extra_logits / self.get_temperature().detach()], dim=1)
        negative_image_index = sample_hard_negatives(speech_to_candidates, same_image_mask(image_ids, candidate_ids))
        negative_speech_index = sample_hard_negatives(logits_per_speech.t(), positives)
        batch_index = torch.arange(len(image_ids), device=image_ids.device)
        has_image_negative = negative_image_index >= 0
        has_speech_negative = negative_speech_index >= 0
        # Pairs: all positives; each speech with its hard-negative image; each image with its hard-negative speech.
        speech_index = torch.cat(
            [batch_index, batch_index[has_image_negative], negative_speech_index[has_speech_negative]]
        )
        image_index = torch.cat(
            [batch_index, negative_image_index[has_image_negative], batch_index[has_speech_negative]]
        )
        num_negatives = int(has_image_negative.sum() + has_speech_negative.sum())
        labels = torch.cat(
            [
                torch.ones(len(batch_index), dtype=torch.long, device=image_ids.device),
                torch.zeros(num_negatives, dtype=torch.long, device=image_ids.device),
            ]
        )
        logits = self.match_logits(
            speech_output.speech_tokens[speech_index],
            speech_output.speech_token_mask[speech_index],
            image_tokens[image_index],
        )
        return sim_loss(logits, labels), logits, labels

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | None = None,
        speech_hidden_states: torch.Tensor | None = None,
        speech_frame_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        compute_sim_loss: bool = True,
        sim_negative_images: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> C2FOutput | tuple:
        r"""
        Args:
            input_values: `[batch, samples]` 16 kHz waveforms from [`C2FProcessor`].
            pixel_values: `[batch, 3, H, W]` images from [`C2FProcessor`]; or give `image_hidden_states`.
            attention_mask: `[batch, samples]` 1 for audio, 0 for padding.
            image_hidden_states: precomputed vision-tower output (frozen-backbone cache) instead of `pixel_values`.
            speech_hidden_states / speech_frame_mask: precomputed speech-backbone frames and their mask (frozen HuBERT
                cache) instead of `input_values`.
            image_ids: `[batch]` integer image identity; items sharing it are positives for each other. Defaults to
                every row being its own image.
            return_loss: compute the in-batch `loss_sic`, and `loss_sim` over SIC-mined hard negatives.
            compute_sim_loss: with `return_loss`, whether to run the SIM head (it costs a multimodal forward).
            sim_negative_images: `(image_tokens [N, 1 + patches, vision_hidden], image_embeds [N, embed_dim],
                image_ids [N])` of images besides the batch (the trainer's queue of past ones) that SIM may draw each
                clip's hard-negative image from, by the same SIC similarity. The clips' negatives for each image still
                come from the batch.

        The model returns its two losses apart and no combined loss: how they are weighted, and which keys SIC sees
        beyond the batch (other ranks, a queue, momentum targets), is the training code's choice. `C2FTrainer` calls
        `sic_loss` on `speech_embeds`, `image_embeds` and `temperature` with its own keys, and adds `loss_sim`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_values is None and speech_hidden_states is None:
            raise ValueError("C2FSpeechImageModel.forward needs input_values (or speech_hidden_states)")
        speech_output = self.encode_speech(input_values, attention_mask, True, speech_hidden_states, speech_frame_mask)
        image_output = self.encode_image(pixel_values, image_hidden_states)
        speech_embeds, image_embeds = speech_output.speech_embeds, image_output.image_embeds
        temperature = self.get_temperature()
        logits_per_speech = speech_embeds @ image_embeds.t() / temperature

        loss_sic = loss_sim = match_logits = match_labels = None
        if return_loss:
            if image_ids is None:
                image_ids = torch.arange(len(speech_embeds), device=speech_embeds.device)
            loss_sic = sic_loss(speech_embeds, image_embeds, image_ids, temperature)[0]
            if compute_sim_loss:
                loss_sim, match_logits, match_labels = self._sim_loss_with_hard_negatives(
                    speech_output, image_output, logits_per_speech.detach(), image_ids, sim_negative_images
                )

        output = C2FOutput(
            loss_sic=loss_sic,
            loss_sim=loss_sim,
            logits_per_speech=logits_per_speech,
            logits_per_image=logits_per_speech.t(),
            speech_embeds=speech_embeds,
            image_embeds=image_embeds,
            match_logits=match_logits,
            match_labels=match_labels,
            temperature=temperature,
            speech_output=speech_output,
            image_output=image_output,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "C2FImageOutput",
    "C2FOutput",
    "C2FRerankOutput",
    "C2FPreTrainedModel",
    "C2FSpeechImageModel",
    "C2FSpeechOutput",
    "same_image_mask",
    "sample_hard_negatives",
    "sic_loss",
    "sim_loss",
]
