"""C2FTrainer: a transformers Trainer that adds the embedding queue, the momentum model and retrieval evaluation."""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

from ..evaluation import evaluate_retrieval
from ..modeling_c2f import sic_loss
from .contrastive import contrastive_keys, distillation_targets, gather_with_grad
from .momentum import MomentumModel
from .queue import EmbeddingQueue, ImageTokenQueue
from .sampling import NeighbourBatchSampler

STATE_FILE = "c2f_training_state.safetensors"
# Raw audio, or a frozen HuBERT's cached frames (SpeechFeatureCache through the collator).
SPEECH_INPUTS = ("input_values", "attention_mask", "speech_hidden_states", "speech_frame_mask")


def join_image_sets(*sets: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    """Concatenate `(image_tokens, image_embeds, image_ids)` sets, skipping absent ones; None when all are."""
    present = [images for images in sets if images is not None]
    if len(present) <= 1:
        return present[0] if present else None
    return tuple(torch.cat([images[part].to(present[0][part].device) for images in present]) for part in range(3))


def missing_checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """What an exact resume needs and `folder` lacks. `trainer_state.json` is written last, so a checkpoint killed while
    saving lacks it; one killed while being rotated away lacks some of the others."""
    folder = Path(folder)
    needed = [TRAINER_STATE_NAME, STATE_FILE, "optimizer.pt", "scheduler.pt"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")
    return missing


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` under `output_dir` that holds everything an exact resume needs (None if none does)."""
    folders = [path for path in Path(output_dir).glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda path: int(path.name.split("-")[-1]), reverse=True):
        if not missing_checkpoint_files(folder):
            return str(folder)
    return None


def refuse_sharded_parameters(accelerator, args) -> None:
    """The momentum model is an EMA over full parameters, kept beside the online model on each rank. FSDP and DeepSpeed
    ZeRO-3 hold only a shard of each parameter per rank, so the copy would average shards: refused, with what to use."""
    if not (args.use_queue or args.use_distillation):
        return
    distributed_type = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    plugin = getattr(accelerator.state, "deepspeed_plugin", None) if distributed_type == "DEEPSPEED" else None
    if distributed_type == "FSDP" or (plugin is not None and plugin.zero_stage == 3):
        scheme = "FSDP" if distributed_type == "FSDP" else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"{scheme} shards every parameter across ranks, and c2f's momentum model (queue and distillation) needs "
            "full parameters on each rank. Use DDP (configs/accelerate_ddp.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate_deepspeed_zero2.yaml, which shards optimizer state and gradients only), or train "
            "without the momentum model: --use_queue false --use_distillation false."
        )


class _MomentumUpdate(TrainerCallback):
    def __init__(self, trainer: "C2FTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        for average in (self.trainer.momentum_model, self.trainer.weight_ema):
            if average is not None:
                average.update()

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.weight_ema is not None:  # the model leaves training as its weight average
            self.trainer.weight_ema.copy_to_online()


class C2FTrainer(Trainer):
    """Trains a `C2FSpeechImageModel` with SIC over batch + queue (momentum soft targets mixed in) and SIM with hard
    negatives. The queue and momentum weights are saved in every checkpoint (safetensors) and restored on resume."""

    def __init__(self, *args, processor=None, **kwargs):
        # Not `processing_class`: Trainer assumes every ProcessorMixin has a tokenizer (transformers 5.24).
        super().__init__(*args, **kwargs)
        refuse_sharded_parameters(self.accelerator, self.args)
        self.processor = processor
        self.momentum_model: MomentumModel | None = None
        self.weight_ema: MomentumModel | None = None
        self.queue: EmbeddingQueue | None = None
        self.sim_queue: ImageTokenQueue | None = None
        self._training_state_ready = False
        self._steps_per_epoch: int | None = None
        self._log_sums: dict[str, torch.Tensor | float] = {}
        self._log_count = 0
        self.add_callback(_MomentumUpdate(self))

    # ------------------------------------------------------------------ training state

    def _ensure_training_state(self):
        if self._training_state_ready:
            return
        self._training_state_ready = True
        model = self.accelerator.unwrap_model(self.model)
        args = self.args
        if args.weight_ema > 0:
            self.weight_ema = MomentumModel(model, args.weight_ema, prefix="weight_ema.", warmup=True)
        if args.use_sim and args.sim_queue_negatives > 0:
            self.sim_queue = ImageTokenQueue(args.sim_queue_negatives)
        if not (args.use_queue or args.use_distillation):
            return  # nothing reads momentum features: no copy to build and update every step
        # It only embeds (queue features, soft targets): the SIM layers are neither copied nor averaged.
        self.momentum_model = MomentumModel(model, args.momentum, unused=("multimodal_encoder", "match_head"))
        device = next(model.parameters()).device
        self.queue = EmbeddingQueue(args.queue_size, model.config.embed_dim, device) if args.use_queue else None

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        self._ensure_training_state()
        state = dict(self.momentum_model.state_dict()) if self.momentum_model is not None else {}
        if self.weight_ema is not None:
            state.update(self.weight_ema.state_dict())
        for queue in (self.queue, self.sim_queue):
            if queue is not None:
                state.update(queue.state_dict())
        return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}

    def _save_optimizer_and_scheduler(self, output_dir):
        """The queue and the momentum weights are optimizer-like state, written with the optimizer: inside the
        checkpoint folder before Trainer writes `trainer_state.json` and rotates older checkpoints, so no checkpoint
        becomes the last one without them."""
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        path = os.path.join(output_dir, STATE_FILE)
        save_file(self.training_state_dict(), path + ".tmp", metadata={"global_step": str(self.state.global_step)})
        os.replace(path + ".tmp", path)  # atomic: a crash leaves the old file or none, never half a file

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        missing = missing_checkpoint_files(resume_from_checkpoint)
        if missing:
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete C2FTrainer checkpoint (missing: {', '.join(missing)}): it was "
                f"cut short while saving or deleting, or not written by C2FTrainer; resume from "
                f"{last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint))) or 'an earlier one'}"
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        self._ensure_training_state()
        state = load_file(path)
        for average in (self.momentum_model, self.weight_ema):
            if average is not None:
                average.load_state_dict(state)
        if self.queue is not None:
            self.queue.load_state_dict(state)
        if self.sim_queue is not None:
            self.sim_queue.load_state_dict(state, next(self.accelerator.unwrap_model(self.model).parameters()).device)
        steps = int(json.loads(Path(resume_from_checkpoint, TRAINER_STATE_NAME).read_text())["global_step"])
        for name in ("augmentation", "image_augmentation"):
            augmentation = getattr(self.data_collator, name, None)
            if augmentation is not None:  # its draws are numbered by batch: continue from the checkpoint's batch
                augmentation.batch_number = steps * self.args.gradient_accumulation_steps

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.neighbour_batches:
            return super()._get_train_sampler(train_dataset)
        if self.args.train_sampling_strategy != "random":
            raise ValueError(f"--neighbour_batches chooses the batches itself; it cannot be combined with "
                             f"train_sampling_strategy={self.args.train_sampling_strategy!r}")
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        missing = [name for name in ("image_id", "caption") if name not in dataset.column_names]
        if missing:
            raise ValueError(f"--neighbour_batches needs the training set's {' and '.join(missing)} column(s)")
        return NeighbourBatchSampler(dataset["image_id"], dataset["caption"], self.args.per_device_train_batch_size,
                                     seed=self.args.draw_seed, neighbours=self.args.batch_neighbours)

    # ------------------------------------------------------------------ loss

    def optimizer_steps(self, epochs: float) -> float:
        """Optimizer steps in `epochs` epochs, counted the way Trainer counts an epoch (whatever max_steps says)."""
        if self._steps_per_epoch is None:
            batches = len(self.get_train_dataloader())
            self._steps_per_epoch = max(batches // self.args.gradient_accumulation_steps, 1)
        return epochs * self._steps_per_epoch

    def momentum_started(self) -> bool:
        return self.state.global_step >= self.optimizer_steps(self.args.momentum_start_epochs)

    def queue_filling(self) -> bool:
        """The queue fills during the steps that just fill it before it joins (and all along after): momentum
        features computed earlier would be pushed out unused, at the cost of a forward pass each step."""
        if self.queue is None:
            return False
        fill_steps = -(-self.args.queue_size // (self.args.per_device_train_batch_size * max(1, self.args.world_size)))
        return self.state.global_step >= self.optimizer_steps(self.args.momentum_start_epochs) - fill_steps

    def current_alpha(self) -> float:
        args = self.args
        if not args.use_distillation or not self.momentum_started():
            return 0.0
        warmup = self.optimizer_steps(args.alpha_warmup_epochs)
        since = self.state.global_step - self.optimizer_steps(args.momentum_start_epochs)
        return args.distill_alpha * (min(1.0, since / warmup) if warmup > 0 else 1.0)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.contiguous()) if self.accelerator.num_processes > 1 else tensor

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`sic + sim_loss_weight * sim`, where SIC scores the batch against `[batch of all ranks, queue]` with the
        momentum model's soft targets mixed in, and SIM is the model's own (its weights must run inside `forward`), handed
        the SIM image queue's past images as more candidates for its hard negatives when there is one."""
        self._ensure_training_state()
        args = self.args
        image_ids = inputs["image_ids"]
        image_inputs = {key: inputs[key] for key in ("pixel_values", "image_hidden_states") if key in inputs}
        speech_inputs = {key: inputs[key] for key in SPEECH_INPUTS if key in inputs}
        sim_negatives = self.sim_queue.items() if self.sim_queue is not None else None
        if args.mirror_negatives and args.use_sim and model.training:
            sim_negatives = join_image_sets(sim_negatives, self._mirror_negatives(model, inputs))
        outputs = model(**speech_inputs, **image_inputs, image_ids=image_ids, return_loss=True, compute_sim_loss=args.use_sim,
                        sim_negative_images=sim_negatives)

        queue = self.queue.keys() if self.queue is not None and self.momentum_started() else None
        alpha = self.current_alpha()
        filling = model.training and self.queue_filling()
        distributed = self.accelerator.num_processes > 1
        all_ids = self._gather(image_ids)
        keys = contrastive_keys(gather_with_grad(outputs.speech_embeds) if distributed else outputs.speech_embeds,
                                gather_with_grad(outputs.image_embeds) if distributed else outputs.image_embeds,
                                all_ids, queue)
        targets = (None, None)
        if filling or alpha > 0:  # the momentum features feed the queue and the soft targets; nothing else
            momentum = self.momentum_model.model
            with torch.no_grad():
                momentum_speech = momentum.get_speech_features(**speech_inputs)
                momentum_image = momentum.get_image_features(**image_inputs)
                all_speech, all_image = self._gather(momentum_speech), self._gather(momentum_image)
            if alpha > 0:
                momentum_keys = contrastive_keys(all_speech, all_image, all_ids, queue)
                soft_temperature = (outputs.temperature.detach() if args.distill_temperature is None
                                    else torch.tensor(args.distill_temperature, device=outputs.temperature.device))
                targets = distillation_targets(momentum_speech, momentum_image, momentum_keys, soft_temperature)
        loss_sic = sic_loss(outputs.speech_embeds, outputs.image_embeds, image_ids, outputs.temperature,
                            keys.speech, keys.image, keys.image_ids, *targets, distill_alpha=alpha)[0]
        loss = loss_sic + args.sim_loss_weight * outputs.loss_sim if args.use_sim else loss_sic
        if model.training:
            self._remember_for_logs(loss_sic, outputs, alpha)
        if filling:
            self.queue.enqueue(all_speech, all_image, all_ids)
        if self.sim_queue is not None and model.training:
            self.sim_queue.enqueue(outputs.image_output.image_tokens, outputs.image_embeds, image_ids)
        return (loss, outputs) if return_outputs else loss

    def _mirror_negatives(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`(image_tokens, image_embeds, image_ids)` of the mirror images of the batch's images that their captions
        contradict (`mirror_axes`: 1 left-right, 2 up-down, 0 none), as more candidates for SIM's hard negatives. Their
        tokens keep gradients, so the vision tower learns where things are from them; their ids (`-1 - id`) match no
        real image."""
        if "mirror_axes" not in inputs or "pixel_values" not in inputs:
            raise ValueError("--mirror_negatives needs `mirror_axes` in the batch (the training set's `mirror_axis` "
                             "column) and images as pixels (not a frozen tower's feature cache)")
        axes = inputs["mirror_axes"]
        rows = (axes > 0).nonzero().squeeze(1)
        if len(rows) == 0:
            return None
        pixels = inputs["pixel_values"][rows]
        left_right = (axes[rows] == 1).view(-1, 1, 1, 1)
        mirrored = torch.where(left_right, pixels.flip(-1), pixels.flip(-2))
        output = self.accelerator.unwrap_model(model).encode_image(mirrored, average_views=False)
        return output.image_tokens, output.image_embeds.detach(), -1 - inputs["image_ids"][rows]

    def _remember_for_logs(self, loss_sic: torch.Tensor, outputs, alpha: float) -> None:
        parts = {"loss_sic": loss_sic, "loss_sim": outputs.loss_sim, "temperature": outputs.temperature}
        for name, value in parts.items():
            if value is not None:  # summed as tensors: no device sync per step
                self._log_sums[name] = self._log_sums.get(name, 0) + value.detach().float()
        self._log_sums["alpha"] = self._log_sums.get("alpha", 0) + alpha
        self._log_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also carry the SIC and SIM losses, the temperature, alpha and the queue fill, averaged over
        the steps since the last log: the combined loss alone hides which part moves."""
        if "loss" in logs and self._log_count:
            for name, total in self._log_sums.items():
                logs[name] = round(float(total) / self._log_count, 4)
            logs["queue_fill"] = self.queue.filled if self.queue is not None else 0
            self._log_sums, self._log_count = {}, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Retrieval metrics (R@1/5/10 both ways, coarse and SIM re-ranked) instead of an eval loss."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("C2FTrainer.evaluate needs an eval_dataset")
        model = self.accelerator.unwrap_model(self.model)
        metrics = evaluate_retrieval(
            model, dataset, self.processor, self.args.eval_rerank_k, self.args.per_device_eval_batch_size,
            progress=not self.args.disable_tqdm and self.is_world_process_zero(),
        )
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
