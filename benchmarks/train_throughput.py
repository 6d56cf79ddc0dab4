"""Training samples/s with and without the frozen image-feature cache, measured in one run.

The tiny demo tower costs almost nothing, so this benchmark freezes a ViT-S-sized BLIP-2 tower (384-d, 8 layers,
224 px, 16 px patches) in front of the tiny speech side: the share of time the cache saves grows with the tower
(BLIP-2's ViT-g is 1B parameters).

    python benchmarks/train_throughput.py [--steps 12] [--batch 16]
"""

import argparse
import tempfile
import time

import torch

from c2f.data import SpeechImageCollator, load_demo
from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.presets import tiny_config, tiny_processor
from c2f.training import C2FTrainer, C2FTrainingArguments
from c2f.training.feature_cache import ImageFeatureCache

VIT_S = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=6, image_size=224,
             patch_size=16, initializer_range=0.02)


def samples_per_second(dataset, processor, cache, steps, batch, output_dir):
    torch.manual_seed(0)
    model = C2FSpeechImageModel(tiny_config(vision_config=VIT_S, freeze_image_backbone=True))
    args = C2FTrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch,
                                queue_size=batch * 4, report_to="none", save_strategy="no", use_cpu=True,
                                logging_steps=steps, disable_tqdm=True)
    trainer = C2FTrainer(model=model, args=args, train_dataset=dataset, processor=processor,
                         data_collator=SpeechImageCollator(processor, image_features=cache))
    start = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    processor = tiny_processor(image_size=VIT_S["image_size"])
    dataset = load_demo("train").select(range(args.steps * args.batch))
    with tempfile.TemporaryDirectory() as folder:
        model = C2FSpeechImageModel(tiny_config(vision_config=VIT_S))
        start = time.perf_counter()
        cache = ImageFeatureCache.build(model.vision_model, processor, dataset, folder)
        build_seconds = time.perf_counter() - start
        without = samples_per_second(dataset, processor, None, args.steps, args.batch, folder)
        with_cache = samples_per_second(dataset, processor, cache, args.steps, args.batch, folder)
    print(f"| frozen ViT-S tower, batch {args.batch}, {args.steps} steps | samples/s |")
    print("|---|---|")
    print(f"| without cache (ViT every step) | {without:.1f} |")
    print(f"| with cache (features read from safetensors) | {with_cache:.1f} |")
    print(f"| speed-up | {with_cache / without:.2f}x |")
    print(f"| one-off cache build ({len(cache)} images) | {build_seconds:.1f} s |")


if __name__ == "__main__":
    main()
