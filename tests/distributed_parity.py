"""Helper for test_distributed.py: train a few steps and save loss, queue and weights.

Run as `torchrun --nproc_per_node N tests/distributed_parity.py OUT PER_DEVICE_BATCH`. Everything that could differ
between 1 and N processes for reasons other than the gathering is switched off: no dropout or layerdrop, no
frequency warp (each rank would draw its own factors), sequential sampling, a front end that honours the attention
mask (so per-rank padding does not matter), and no SIM (its hard negatives are mined within each rank's batch by
design).
"""

import sys

import torch
from safetensors.torch import save_file
from torch.utils.data import SequentialSampler

from c2f.data import SpeechImageCollator, load_demo
from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.presets import tiny_config, tiny_processor
from c2f.training import C2FTrainer, C2FTrainingArguments


class SequentialC2FTrainer(C2FTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main(out: str, per_device_batch: int):
    torch.manual_seed(0)
    speech = dict(tiny_config().speech_config.to_dict(), feat_extract_norm="layer", do_stable_layer_norm=True,
                  hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  final_dropout=0.0, layerdrop=0.0)
    model = C2FSpeechImageModel(tiny_config(speech_config=speech, hidden_dropout=0.0, speech_frequency_warp=0.0))
    processor = tiny_processor()
    args = C2FTrainingArguments(
        output_dir=out, max_steps=3, per_device_train_batch_size=per_device_batch, learning_rate=1e-3, queue_size=16,
        use_sim=False, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=3,
        dataloader_num_workers=0, alpha_warmup_epochs=0.0,
        # Attention key biases have a gradient of exactly zero in theory (softmax ignores a constant shift), so what
        # they get is float noise that differs between 1 and 2 processes; Adam with eps 1e-8 turns that noise into
        # steps of ~lr (1.7e-4 apart after 3 steps). A larger eps keeps pure noise from moving weights.
        adam_epsilon=1e-6,
    )
    trainer = SequentialC2FTrainer(model=model, args=args, train_dataset=load_demo("validation").select(range(24)),
                                   data_collator=SpeechImageCollator(processor), processor=processor)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
        state = {"losses": losses, **trainer.training_state_dict()}
        state.update({f"model.{name}": tensor.contiguous() for name, tensor in trainer.model.state_dict().items()})
        save_file(state, f"{out}/parity.safetensors")
    # Each rank leaves the gloo group before the interpreter exits: left to exit with its threads alive, a rank died
    # with "terminate called without an active exception" (SIGABRT) in 2 of 6 clean-clone CI runs on 2026-11-27.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
