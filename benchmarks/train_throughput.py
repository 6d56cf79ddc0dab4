"""Training speed, measured in one run: the trainer against a bare loop, and the frozen image-feature cache.

1. `C2FTrainer` (what `run_retrieval.py` runs) against a bare PyTorch loop doing the same work (forward, the same
   losses, momentum copy and queue for `full`, backward, AdamW) over the same tiny demo model and the same decoded
   batches. Target: the trainer keeps >= 0.9x the loop's steps/s.
2. Training samples/s with and without the frozen-backbone feature caches: the image cache on a ViT-S-sized BLIP-2
   tower (384-d, 8 layers, 224 px; the tiny demo tower costs almost nothing, and the share the cache saves grows with
   the tower), and the HuBERT cache on a frozen HuBERT with base's waveform front end and 4 transformer layers.

    python benchmarks/train_throughput.py [--steps 60] [--batch 32] [--recipe sic|full]
"""

import argparse
import copy
import tempfile
import time

import torch

from c2f.data import SpeechImageCollator, load_demo
from c2f.modeling_c2f import C2FSpeechImageModel, sic_loss
from c2f.presets import tiny_config, tiny_processor
from c2f.training import C2FTrainer, C2FTrainingArguments, EmbeddingQueue
from c2f.training.contrastive import contrastive_keys, distillation_targets
from c2f.backbone_checkpoints import hubert_config
from c2f.training.feature_cache import ImageFeatureCache, SpeechFeatureCache

VIT_S = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=6, image_size=224,
             patch_size=16, initializer_range=0.02)
RECIPES = {
    "sic": dict(use_queue=False, use_distillation=False, use_sim=False),
    "full": dict(use_queue=True, use_distillation=True, use_sim=True),
}


class FixedBatches(torch.utils.data.Dataset):
    """Row i is batch i, already collated: both sides train on exactly the same tensors, decoding excluded."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def trainer_steps_per_second(batches, processor, recipe, output_dir):
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config())
    args = C2FTrainingArguments(output_dir=output_dir, max_steps=len(batches), per_device_train_batch_size=1,
                                queue_size=1024, momentum_start_epochs=0, report_to="none", save_strategy="no",
                                use_cpu=True, logging_steps=len(batches), disable_tqdm=True, dataloader_num_workers=0,
                                **RECIPES[recipe])
    trainer = C2FTrainer(model=model, args=args, train_dataset=FixedBatches(batches), processor=processor,
                         data_collator=lambda rows: rows[0])
    start = time.perf_counter()
    trainer.train()
    return len(batches) / (time.perf_counter() - start)


def loop_steps_per_second(batches, recipe):
    """The same work written as a bare loop: for `full`, a momentum copy (EMA every step) whose features feed the
    queue and the soft targets, and SIM; for `sic`, in-batch SIC alone."""
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config()).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=5e-4)
    full = recipe == "full"
    momentum = copy.deepcopy(model).eval().requires_grad_(False) if full else None
    momentum_parameters = [p for p in momentum.parameters()] if full else []
    queue = EmbeddingQueue(1024, model.config.embed_dim) if full else None
    start = time.perf_counter()
    for batch in batches:
        model_inputs = {key: value for key, value in batch.items() if key != "image_ids"}
        outputs = model(**model_inputs, image_ids=batch["image_ids"], return_loss=True, compute_sim_loss=full)
        if full:
            with torch.no_grad():
                speech = momentum.get_speech_features(batch["input_values"], batch["attention_mask"])
                image = momentum.get_image_features(batch["pixel_values"])
            keys = contrastive_keys(outputs.speech_embeds, outputs.image_embeds, batch["image_ids"], queue.keys())
            targets = distillation_targets(speech, image, contrastive_keys(speech, image, batch["image_ids"], queue.keys()),
                                           outputs.temperature.detach())
            loss = sic_loss(outputs.speech_embeds, outputs.image_embeds, batch["image_ids"], outputs.temperature,
                            keys.speech, keys.image, keys.image_ids, *targets, distill_alpha=0.4)[0] + outputs.loss_sim
            queue.enqueue(speech, image, batch["image_ids"])
        else:
            loss = sic_loss(outputs.speech_embeds, outputs.image_embeds, batch["image_ids"], outputs.temperature)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if full:
            with torch.no_grad():
                torch._foreach_mul_(momentum_parameters, 0.98)
                torch._foreach_add_(momentum_parameters, [p.detach() for p in model.parameters()], alpha=0.02)
    return len(batches) / (time.perf_counter() - start)


def cached_samples_per_second(dataset, processor, config, freeze, collator, steps, batch, output_dir):
    torch.manual_seed(0)
    model = C2FSpeechImageModel(config).freeze_backbones(**freeze)
    args = C2FTrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch,
                                queue_size=batch * 4, report_to="none", save_strategy="no", use_cpu=True,
                                logging_steps=steps, disable_tqdm=True)
    trainer = C2FTrainer(model=model, args=args, train_dataset=dataset, processor=processor, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - start)


def cache_comparison(title, config, freeze, processor, dataset, build, cache_argument, steps, batch):
    """Training samples/s without and with one frozen-backbone cache (same model, steps and batches); `freeze` names
    the backbones to freeze (`freeze_backbones` arguments)."""
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        start = time.perf_counter()
        cache = build(C2FSpeechImageModel(config).freeze_backbones(**freeze), folder)
        build_seconds = time.perf_counter() - start
        without = cached_samples_per_second(dataset, processor, config, freeze, SpeechImageCollator(processor), steps, batch, folder)
        with_cache = cached_samples_per_second(dataset, processor, config, freeze,
                                               SpeechImageCollator(processor, **{cache_argument: cache}), steps, batch, folder)
    print(f"\n| {title}, batch {batch}, {steps} steps | samples/s |")
    print("|---|---|")
    print(f"| without cache (backbone every step) | {without:.1f} |")
    print(f"| with cache (features read from safetensors) | {with_cache:.1f} |")
    print(f"| speed-up | {with_cache / without:.2f}x |")
    print(f"| one-off cache build ({len(cache)} items) | {build_seconds:.1f} s |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--recipe", choices=sorted(RECIPES), nargs="+", default=["sic", "full"])
    parser.add_argument("--cache-steps", type=int, default=12, help="steps of the image-cache comparison (0: skip)")
    args = parser.parse_args()
    processor = tiny_processor()
    train = load_demo("train")
    collator = SpeechImageCollator(processor)
    batches = [collator([train[row] for row in range(start, start + args.batch)])
               for start in range(0, args.steps * args.batch, args.batch)]
    loop_steps_per_second(batches[:5], "full")  # warm-up: the first steps of a process pay for allocation
    print(f"| tiny demo model, batch {args.batch}, {args.steps} steps | bare loop steps/s | C2FTrainer steps/s | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for recipe in args.recipe:
            loop_speed = loop_steps_per_second(batches, recipe)
            trainer_speed = trainer_steps_per_second(batches, processor, recipe, folder)
            print(f"| {recipe} | {loop_speed:.2f} | {trainer_speed:.2f} | {trainer_speed / loop_speed:.2f}x |", flush=True)
    if args.cache_steps == 0:
        return
    cache_batch = 16
    dataset = train.select(range(args.cache_steps * cache_batch))
    vit_processor = tiny_processor(image_size=VIT_S["image_size"])
    cache_comparison("frozen ViT-S tower", tiny_config(vision_config=VIT_S, vision_stem="patch"), dict(image=True),
                     vit_processor, dataset,
                     lambda model, folder: ImageFeatureCache.build(model.vision_model, vit_processor, dataset, folder),
                     "image_features", args.cache_steps, cache_batch)
    # HuBERT's own waveform front end (seven conv layers, 512 channels) with 4 of its 12 transformer layers.
    hubert = hubert_config("base", num_hidden_layers=4).to_dict()
    cache_comparison("frozen HuBERT (base front end, 4 layers)",
                     tiny_config(speech_config=hubert, speech_front_end="waveform"), dict(speech=True),
                     processor, dataset,
                     lambda model, folder: SpeechFeatureCache.build(model, processor, dataset, folder),
                     "speech_features", args.cache_steps, cache_batch)

if __name__ == "__main__":
    main()
