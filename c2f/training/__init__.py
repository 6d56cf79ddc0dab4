"""Training for c2f: the trainer owns the embedding queue and the momentum model; the model never sees them."""

from .arguments import C2FTrainingArguments
from .momentum import MomentumModel
from .queue import EmbeddingQueue
from .trainer import C2FTrainer

__all__ = ["C2FTrainer", "C2FTrainingArguments", "EmbeddingQueue", "MomentumModel"]
