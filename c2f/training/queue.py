"""The SIC embedding queue: momentum features of past batches, used as extra negatives (MoCo / ALBEF)."""

import torch


class EmbeddingQueue:
    """A ring buffer of (speech, image, image id) momentum features.

    Only the filled part is used as keys: an unfilled slot would be a fake negative. Every rank enqueues the same
    all-gathered features, so the queues stay identical across ranks.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        self.size = size
        self.speech = torch.zeros(size, dim, device=device)
        self.image = torch.zeros(size, dim, device=device)
        self.image_ids = torch.full((size,), -1, dtype=torch.long, device=device)
        self.pointer = 0
        self.filled = 0

    def keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.filled == 0:
            return None
        return self.speech[: self.filled], self.image[: self.filled], self.image_ids[: self.filled]

    @torch.no_grad()
    def enqueue(self, speech: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor) -> None:
        count = len(image_ids)
        if count > self.size:
            raise ValueError(f"queue_size ({self.size}) must be at least the global batch size ({count})")
        positions = (self.pointer + torch.arange(count, device=self.image_ids.device)) % self.size
        self.speech[positions] = speech.detach().to(self.speech)
        self.image[positions] = image.detach().to(self.image)
        self.image_ids[positions] = image_ids.to(self.image_ids)
        self.pointer = (self.pointer + count) % self.size
        self.filled = min(self.size, self.filled + count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "queue.speech": self.speech,
            "queue.image": self.image,
            "queue.image_ids": self.image_ids,
            "queue.pointer": torch.tensor(self.pointer),
            "queue.filled": torch.tensor(self.filled),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["queue.speech"].shape != self.speech.shape:
            raise ValueError(
                f"checkpoint queue has shape {tuple(state['queue.speech'].shape)}, this run expects "
                f"{tuple(self.speech.shape)}: queue_size and embed_dim must match the run being resumed"
            )
        self.speech.copy_(state["queue.speech"])
        self.image.copy_(state["queue.image"])
        self.image_ids.copy_(state["queue.image_ids"])
        self.pointer = int(state["queue.pointer"])
        self.filled = int(state["queue.filled"])
