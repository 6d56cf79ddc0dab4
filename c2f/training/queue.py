"""Queues of past training items: the SIC embedding queue (momentum features, extra negatives as in MoCo / ALBEF) and
the SIM image queue (vision tokens, extra hard-negative images for the matching head)."""

import torch


class _Ring:
    """Slots written in turn, the oldest overwritten first; the first `filled` hold items."""

    def __init__(self, size: int, name: str):
        self.size, self.name = size, name
        self.pointer = 0
        self.filled = 0

    def _next_positions(self, count: int, device: torch.device) -> torch.Tensor:
        if count > self.size:
            raise ValueError(f"{self.name} ({self.size}) must be at least the global batch size ({count})")
        positions = (self.pointer + torch.arange(count, device=device)) % self.size
        self.pointer = (self.pointer + count) % self.size
        self.filled = min(self.size, self.filled + count)
        return positions


class EmbeddingQueue(_Ring):
    """A ring buffer of (speech, image, image id) momentum features.

    Only the filled part is used as keys: an unfilled slot would be a fake negative. Every rank enqueues the same
    all-gathered features, so the queues stay identical across ranks.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        super().__init__(size, "queue_size")
        self.speech = torch.zeros(size, dim, device=device)
        self.image = torch.zeros(size, dim, device=device)
        self.image_ids = torch.full((size,), -1, dtype=torch.long, device=device)

    def keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.filled == 0:
            return None
        return self.speech[: self.filled], self.image[: self.filled], self.image_ids[: self.filled]

    @torch.no_grad()
    def enqueue(self, speech: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor) -> None:
        positions = self._next_positions(len(image_ids), self.image_ids.device)
        self.speech[positions] = speech.detach().to(self.speech)
        self.image[positions] = image.detach().to(self.image)
        self.image_ids[positions] = image_ids.to(self.image_ids)

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


class ImageTokenQueue(_Ring):
    """Past training images as the SIM head reads them (vision tokens), with their embeddings (to rank them for a
    speech clip) and ids: hard-negative images for SIM beyond the batch. The tokens are those the online model
    computed when the image was in a batch, detached. Each rank keeps its own batches' images (tokens are too big to
    gather every step). Sized at the first batch, whose tokens give the shape: `(1 + patches) x vision width` floats
    an item."""

    PREFIX = "sim_queue."

    def __init__(self, size: int):
        super().__init__(size, "sim_queue_negatives")
        self.tokens: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None
        self.image_ids: torch.Tensor | None = None

    def items(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.filled == 0:
            return None
        return self.tokens[: self.filled], self.embeds[: self.filled], self.image_ids[: self.filled]

    @torch.no_grad()
    def enqueue(self, tokens: torch.Tensor, embeds: torch.Tensor, image_ids: torch.Tensor) -> None:
        if self.tokens is None:
            self.tokens = tokens.new_zeros(self.size, *tokens.shape[1:])
            self.embeds = embeds.new_zeros(self.size, *embeds.shape[1:])
            self.image_ids = torch.full((self.size,), -1, dtype=torch.long, device=image_ids.device)
        positions = self._next_positions(len(image_ids), self.image_ids.device)
        self.tokens[positions] = tokens.detach().to(self.tokens)
        self.embeds[positions] = embeds.detach().to(self.embeds)
        self.image_ids[positions] = image_ids.to(self.image_ids)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"pointer": torch.tensor(self.pointer), "filled": torch.tensor(self.filled)}
        if self.tokens is not None:
            state.update(tokens=self.tokens, embeds=self.embeds, image_ids=self.image_ids)
        return {self.PREFIX + name: tensor for name, tensor in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        state = {name[len(self.PREFIX):]: tensor for name, tensor in state.items() if name.startswith(self.PREFIX)}
        if "filled" not in state:
            raise ValueError("the checkpoint holds no SIM image queue: it was saved by a run without --sim_queue_negatives")
        if "tokens" in state and len(state["tokens"]) != self.size:
            raise ValueError(f"checkpoint SIM image queue holds {len(state['tokens'])} images, this run expects "
                             f"{self.size}: sim_queue_negatives must match the run being resumed")
        self.pointer, self.filled = int(state["pointer"]), int(state["filled"])
        if "tokens" in state:
            self.tokens, self.embeds = state["tokens"].to(device), state["embeds"].to(device)
            self.image_ids = state["image_ids"].to(device)
