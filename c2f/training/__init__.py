"""Training for c2f: the trainer owns the queues and the momentum model; the model sees only what the trainer hands
to its forward (SIM's extra hard-negative candidates)."""

from .arguments import C2FTrainingArguments
from .momentum import MomentumModel
from .queue import EmbeddingQueue, ImageTokenQueue
from .trainer import C2FTrainer

__all__ = ["C2FTrainer", "C2FTrainingArguments", "EmbeddingQueue", "ImageTokenQueue", "MomentumModel"]
