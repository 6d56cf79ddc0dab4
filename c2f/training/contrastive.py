"""SIC's keys beyond the batch, assembled in one place.

The online embeddings are scored against `[batch gathered over ranks, queue]`, and momentum distillation's soft
targets are distributions over those same keys: both come from `contrastive_keys` with the same queue and the same
gathered ids, so a target's column j and a logit's column j always name the same item.
"""

from dataclasses import dataclass

import torch


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate over ranks; gradients flow back to each rank's own slice (for in-batch negatives)."""
    import torch.distributed.nn.functional as distributed

    return torch.cat(distributed.all_gather(tensor), dim=0)


@dataclass
class ContrastiveKeys:
    """Keys of the SIC loss: speech and image embeddings `[keys, embed_dim]` and the image id of each key."""

    speech: torch.Tensor
    image: torch.Tensor
    image_ids: torch.Tensor


def contrastive_keys(speech: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor,
                     queue: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> ContrastiveKeys:
    """The (gathered) batch, followed by the queue's `(speech, image, image_ids)` when there is one."""
    if queue is None:
        return ContrastiveKeys(speech, image, image_ids)
    queue_speech, queue_image, queue_ids = queue
    return ContrastiveKeys(
        torch.cat([speech, queue_speech.to(speech.dtype)]),
        torch.cat([image, queue_image.to(image.dtype)]),
        torch.cat([image_ids, queue_ids]),
    )


@torch.no_grad()
def distillation_targets(momentum_speech: torch.Tensor, momentum_image: torch.Tensor, keys: ContrastiveKeys,
                         temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's soft targets: the momentum model's own batch against the momentum keys, softmaxed at the online
    temperature. Returns `(speech_to_image, image_to_speech)`, each `[batch, keys]`."""
    return (
        (momentum_speech @ keys.image.t() / temperature).softmax(dim=1),
        (momentum_image @ keys.speech.t() / temperature).softmax(dim=1),
    )
