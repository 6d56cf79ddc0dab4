"""Queues of past training items: the SIC embedding queue (momentum features, extra negatives as in MoCo / ALBEF) and
the SIM image queue (vision tokens, extra hard-negative images for the matching head)."""

import torch


class _Ring:
    """Row-aligned tensors (`FIELDS`, image ids last) written a batch at a time into `size` slots in turn, the oldest
    overwritten first; only the first `filled` slots hold items. A field still None is sized by the first batch."""

    FIELDS: tuple[str, ...]
    PREFIX: str  # of the checkpoint tensors
    SIZE_ARGUMENT: str  # the training argument that sets `size`, named in errors
    DESCRIPTION: str

    def __init__(self, size: int):
        self.size = size
        self.pointer = 0
        self.filled = 0

    def items(self) -> tuple[torch.Tensor, ...] | None:
        """The filled slots of each field, in `FIELDS` order (None while empty: an unfilled slot is no item)."""
        if self.filled == 0:
            return None
        return tuple(getattr(self, field)[: self.filled] for field in self.FIELDS)

    @torch.no_grad()
    def enqueue(self, *rows: torch.Tensor) -> None:
        count = len(rows[-1])
        if count > self.size:
            raise ValueError(f"{self.SIZE_ARGUMENT} ({self.size}) must be at least the global batch size ({count})")
        for field, values in zip(self.FIELDS, rows):
            if getattr(self, field) is None:
                empty = -1 if field == "image_ids" else 0
                setattr(self, field, torch.full((self.size, *values.shape[1:]), empty, dtype=values.dtype, device=values.device))
        positions = (self.pointer + torch.arange(count, device=self.image_ids.device)) % self.size
        for field, values in zip(self.FIELDS, rows):
            buffer = getattr(self, field)
            buffer[positions] = values.detach().to(buffer)
        self.pointer = (self.pointer + count) % self.size
        self.filled = min(self.size, self.filled + count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"pointer": torch.tensor(self.pointer), "filled": torch.tensor(self.filled)}
        state.update({field: getattr(self, field) for field in self.FIELDS if getattr(self, field) is not None})
        return {self.PREFIX + name: tensor for name, tensor in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        state = {name[len(self.PREFIX):]: tensor for name, tensor in state.items() if name.startswith(self.PREFIX)}
        if "filled" not in state:
            raise ValueError(f"the checkpoint holds no {self.DESCRIPTION}: it was saved by a run without --{self.SIZE_ARGUMENT}")
        for field in self.FIELDS:
            if field not in state:  # saved before its first batch
                continue
            saved, current = state[field], getattr(self, field)
            expected = current.shape if current is not None else (self.size, *saved.shape[1:])
            if saved.shape != expected:
                raise ValueError(f"checkpoint {self.DESCRIPTION} has shape {tuple(saved.shape)}, this run expects "
                                 f"{tuple(expected)}: {self.SIZE_ARGUMENT} must match the run being resumed, and so "
                                 "must the feature sizes")
            if current is None:
                setattr(self, field, saved.to(device))
            else:
                current.copy_(saved)
        self.pointer, self.filled = int(state["pointer"]), int(state["filled"])


class EmbeddingQueue(_Ring):
    """A ring buffer of (speech, image, image id) momentum features, float32 whatever the batch's precision.

    Only the filled part is used as keys: an unfilled slot would be a fake negative. Every rank enqueues the same
    all-gathered features, so the queues stay identical across ranks.
    """

    FIELDS = ("speech", "image", "image_ids")
    PREFIX = "queue."
    SIZE_ARGUMENT = "queue_size"
    DESCRIPTION = "embedding queue"

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        super().__init__(size)
        self.speech = torch.zeros(size, dim, device=device)
        self.image = torch.zeros(size, dim, device=device)
        self.image_ids = torch.full((size,), -1, dtype=torch.long, device=device)

    def keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`(speech, image, image ids)` of the filled slots: SIC's extra keys."""
        return self.items()


class ImageTokenQueue(_Ring):
    """Past training images as the SIM head reads them (vision tokens), with their embeddings (to rank them for a
    speech clip) and ids: hard-negative images for SIM beyond the batch. The tokens are those the online model
    computed when the image was in a batch, detached. Each rank keeps its own batches' images (tokens are too big to
    gather every step). Sized at the first batch, whose tokens give the shape: `(1 + patches) x vision width` floats
    an item."""

    FIELDS = ("tokens", "embeds", "image_ids")
    PREFIX = "sim_queue."
    SIZE_ARGUMENT = "sim_queue_negatives"
    DESCRIPTION = "SIM image queue"

    def __init__(self, size: int):
        super().__init__(size)
        self.tokens: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None
        self.image_ids: torch.Tensor | None = None
