from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


@dataclass
class C2FTrainingArguments(TrainingArguments):
    """Training arguments plus the ALBEF-style knobs (defaults from the design card) and ablation switches."""

    queue_size: int = field(default=65536, metadata={"help": "SIC embedding queue length (a ring buffer: any size from the global batch size up)."})
    momentum: float = field(default=0.995, metadata={"help": "EMA factor of the momentum model, per optimizer step."})
    distill_alpha: float = field(default=0.4, metadata={"help": "Weight of the momentum model's soft SIC targets."})
    distill_temperature: float | None = field(default=None, metadata={"help": "Temperature of the momentum model's soft targets (default: the online temperature, as ALBEF). On the demo the learnt temperature ends near 0.01 (with or without the queue), where the targets are almost one-hot."})
    alpha_warmup_epochs: float = field(default=1.0, metadata={"help": "Ramp alpha linearly from 0 over this many epochs (counted from momentum_start_epochs)."})
    momentum_start_epochs: float = field(default=0.0, metadata={"help": "SIC over the batch only for this many epochs; then the queue (filled all along) and the momentum soft targets join. For towers trained from scratch, whose momentum copy starts uninformative."})
    weight_ema: float = field(default=0.0, metadata={"help": "Keep an EMA of all trainable weights with this factor per step, and end training with it in place of the last weights (0: off). Not the momentum model, which only makes targets."})
    sim_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the SIM loss next to the SIC loss."})
    eval_rerank_k: int | None = field(default=None, metadata={"help": "SIM re-rank depth at evaluation (default: config.k_test)."})
    use_queue: bool = field(default=True, metadata={"help": "Use the momentum embedding queue as extra SIC negatives."})
    use_sim: bool = field(default=True, metadata={"help": "Train the SIM matching head with hard negatives."})
    sim_queue_negatives: int = field(default=0, metadata={"help": "Draw SIM's hard-negative image for each clip from the batch and the last this many training images (their vision tokens kept on this rank), not the batch alone (0, as ALBEF). Each costs (1 + patches) x vision width floats."})
    mirror_negatives: bool = field(default=False, metadata={"help": "SIM may also draw each clip's hard-negative image from mirror images of the batch's images that their captions contradict (the training set's `mirror_axis` column: 1 left-right, 2 up-down, 0 none; the demo derives it from its captions). The same objects in the wrong arrangement, which in-batch draws offer only some of the time. On the demo with SIM image positions (the tiny preset's) it made SIM tell arrangement twins apart on seeds 1 and 2 (87 and 89 percent of test pairs; 58 and 82 without), +22.5 and +10.8 summed re-ranked R@1 on the held-out voices. Off by default for its cost: a vision forward and backward per mirrored image, 60-90 s more of a 2-core default run, which would leave it near its 10-minute budget (docs/demo_measurements.md)."})
    use_distillation: bool = field(default=True, metadata={"help": "Mix momentum soft targets into the SIC targets."})
    neighbour_batches: bool = field(default=False, metadata={"help": "Build each training batch from pairs: a random clip and a clip of an image whose caption is among its nearest (TF-IDF), so SIC and SIM meet hard negatives in every batch. Needs caption text."})
    batch_neighbours: int = field(default=3, metadata={"help": "With neighbour_batches: a partner image is drawn from this many nearest captions."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the raw columns."})
    dataloader_pin_memory: bool = field(default_factory=torch.cuda.is_available, metadata={"help": "Pin batches in page-locked memory (default: only when CUDA is there, which is the only case it helps and the only one without a warning)."})
    average_tokens_across_devices: bool = field(default=False, metadata={"help": "Kept False: c2f's loss is a per-batch mean."})

    @property
    def draw_seed(self) -> int:
        """Seed of c2f's own data draws (neighbour batches, voice and image augmentation): `data_seed` when set, as the
        Trainer's own sampler reads it, else `seed`. So `--data_seed` changes what the model sees and `--seed` alone
        how it starts."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self):
        super().__post_init__()
        if self.distill_temperature is not None and not self.distill_temperature > 0:
            raise ValueError(f"--distill_temperature must be a positive temperature, got {self.distill_temperature}")
