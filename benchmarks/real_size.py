"""c2f at real size: HuBERT-base/-large and the BLIP-2 ViT-g/14, from checkpoints in the Hub repos' layouts.

Writes random-weight full-size checkpoints once (`c2f.backbone_checkpoints`), then for each HuBERT size and batch size
runs, in a fresh process (so peak memory is that configuration's own): `from_backbones`, the frozen-image feature
cache for the images the steps use, and `C2FTrainer` training steps of the full recipe (SIC over batch + queue with
momentum distillation, SIM with hard negatives) on demo clips. Prints parameters (total / trainable), peak RSS (and peak
GPU memory on CUDA), seconds per step, samples/s, the cache's build time and bytes per image. With `--compare_uncached`
it also times the same steps with the ViT-g running every step instead of the cache (the issue's >= 20x target).

    python benchmarks/real_size.py                                     # CPU: hubert base, batch 4, + uncached
    python benchmarks/real_size.py --device cuda --bf16 --speech base large --batch 64 128

Not part of the test suite: the checkpoints take 5.6 GB on disk and the ViT-g about a second per image on a laptop.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def ensure_checkpoints(folder: Path, sizes: list[str], tiny: bool) -> dict[str, Path]:
    from transformers import Blip2VisionConfig

    from c2f.backbone_checkpoints import hubert_config, write_blip2_checkpoint, write_hubert_checkpoint

    # --tiny: the same layouts at toy width, to check this script end to end in seconds.
    small_hubert = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    small_vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                        patch_size=14)
    paths = {}
    for size in sizes:
        path = folder / f"hubert-{size}{'-tiny' if tiny else ''}"
        if not (path / "model.safetensors").is_file():
            started = time.perf_counter()
            write_hubert_checkpoint(path, hubert_config(size, **(small_hubert if tiny else {})))
            print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
        paths[size] = path
    path = folder / f"blip2{'-tiny' if tiny else ''}"
    if not (path / "config.json").is_file():
        started = time.perf_counter()
        write_blip2_checkpoint(path, Blip2VisionConfig(**(small_vision if tiny else {})))
        print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
    paths["blip2"] = path
    return paths


class _StepTimer:
    """Wall time of every optimizer step, synchronised with the GPU so queued kernels are counted."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.sync()
                timer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.sync()
                timer.seconds.append(time.perf_counter() - timer.started)

        self.callback = Callback()
        self.seconds: list[float] = []

    @staticmethod
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def per_step(self, skip: int) -> float:
        kept = self.seconds[skip:] or self.seconds
        return sorted(kept)[len(kept) // 2]


def measure(spec: dict) -> dict:
    """One configuration, in this process: build, cache, train `steps` steps; returns the numbers."""
    from c2f import C2FProcessor, C2FSpeechImageModel
    from c2f.data import SpeechImageCollator, load_demo
    from c2f.training import C2FTrainer, C2FTrainingArguments
    from c2f.training.feature_cache import ImageFeatureCache, SpeechFeatureCache
    from benchmarks.train_throughput import FixedBatches

    device = spec["device"]
    started = time.perf_counter()
    model = C2FSpeechImageModel.from_backbones(spec["hubert"], spec["blip2"]).freeze_backbones(
        image=True, speech=spec["freeze_speech"], speech_feature_encoder=True)
    processor = C2FProcessor.from_backbones(spec["hubert"], spec["blip2"])
    load_seconds = time.perf_counter() - started
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    model.to(device)
    batch, steps = spec["batch"], spec["steps"]
    rows = load_demo("train").select(range(batch * steps))
    result = dict(speech=spec["speech"], batch=batch, params_total=total, params_trainable=trainable,
                  load_s=round(load_seconds, 1), attention=model.config.speech_config._attn_implementation)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        cache = ImageFeatureCache.build(model.vision_model, processor, rows, scratch, batch_size=spec["cache_batch"])
        if device == "cuda":
            torch.cuda.synchronize()
        cache_seconds = time.perf_counter() - started
        result.update(cache_images=len(cache), cache_s_per_image=round(cache_seconds / len(cache), 4),
                      cache_bytes_per_image=round(cache.path.stat().st_size / len(cache)))
        # A frozen HuBERT is cached too (both variants below): the comparison then isolates the ViT-g.
        speech = SpeechFeatureCache.build(model, processor, rows, scratch) if spec["freeze_speech"] else None
        for cached in ([True, False] if spec["compare_uncached"] else [True]):
            collate = SpeechImageCollator(processor, image_features=cache if cached else None, speech_features=speech)
            batches = [collate([rows[index] for index in range(step * batch, (step + 1) * batch)]) for step in range(steps)]
            args = C2FTrainingArguments(
                output_dir=os.path.join(scratch, "run"), max_steps=steps, per_device_train_batch_size=1,
                learning_rate=1e-5, queue_size=max(1024, 4 * batch), momentum_start_epochs=0, report_to="none",
                save_strategy="no", logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0,
                use_cpu=device == "cpu", bf16=spec["bf16"], gradient_checkpointing=spec["gradient_checkpointing"],
            )
            timer = _StepTimer()
            trainer = C2FTrainer(model=model, args=args, train_dataset=FixedBatches(batches), processor=processor,
                                 data_collator=lambda items: items[0], callbacks=[timer.callback])
            trainer.train()
            seconds = timer.per_step(skip=min(spec["warmup"], steps - 1))
            key = "cached" if cached else "uncached"
            result[f"{key}_s_per_step"] = round(seconds, 4)
            result[f"{key}_step_seconds"] = [round(value, 3) for value in timer.seconds]
            result[f"{key}_samples_per_s"] = round(batch / seconds, 2)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if device == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speech", nargs="+", default=["base"], choices=["base", "large"])
    parser.add_argument("--batch", nargs="+", type=int, default=[4])
    parser.add_argument("--steps", type=int, default=5, help="Training steps per configuration; the median of the "
                        "steps after --warmup is reported.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out of the timing (allocator growth, "
                        "kernel selection).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CUDA).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute HuBERT's activations in "
                        "the backward pass instead of storing them.")
    parser.add_argument("--compare_uncached", action="store_true", default=None,
                        help="Also time steps with the ViT-g running (default: on for CPU).")
    parser.add_argument("--freeze_speech", action="store_true", help="Freeze HuBERT too and read its frames from the "
                        "speech feature cache (SpeechCLIP's setting).")
    parser.add_argument("--cache_batch", type=int, default=16, help="Images per ViT-g forward while caching.")
    parser.add_argument("--checkpoints", default="outputs/real_size/checkpoints")
    parser.add_argument("--tiny", action="store_true", help="Toy-width checkpoints in the same layouts (smoke test).")
    parser.add_argument("--json", help="Also write the results here.")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print("RESULT " + json.dumps(measure(json.loads(args._worker))), flush=True)
        return
    compare = args.device == "cpu" if args.compare_uncached is None else args.compare_uncached
    paths = ensure_checkpoints(Path(args.checkpoints), args.speech, args.tiny)
    results = []
    for speech in args.speech:
        for batch in args.batch:
            spec = dict(speech=speech, hubert=str(paths[speech]), blip2=str(paths["blip2"]), batch=batch,
                        steps=args.steps, warmup=args.warmup, device=args.device, bf16=args.bf16, cache_batch=args.cache_batch,
                        gradient_checkpointing=args.gradient_checkpointing, compare_uncached=compare,
                        freeze_speech=args.freeze_speech)
            # A fresh process per configuration: its peak RSS and GPU memory are its own.
            completed = subprocess.run([sys.executable, "-m", "benchmarks.real_size", "--_worker", json.dumps(spec)],
                                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                error = (completed.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"hubert-{speech} batch {batch}: failed ({error})", flush=True)
                results.append(dict(speech=speech, batch=batch, error=error))
                continue
            results.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(results[-1]), flush=True)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: list[dict], args) -> None:
    import platform

    machine = results[0].get("gpu") if results and "gpu" in results[0] else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    print(f"\nc2f real size on {machine}, {'bf16' if args.bf16 else 'fp32'}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; steps of the full recipe, "
          f"image tower frozen and cached{', HuBERT frozen and cached' if args.freeze_speech else ''}")
    columns = ["speech", "batch", "params (total / trainable)", "s/step", "samples/s", "peak RSS GiB"]
    gpu = any("peak_gpu_gib" in result for result in results)
    uncached = any("uncached_s_per_step" in result for result in results)
    columns += ["peak GPU GiB"] * gpu + ["s/step, ViT-g running", "cache speed-up"] * uncached
    columns += ["cache s/image", "cache bytes/image"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for result in results:
        if "error" in result:
            print(f"| hubert-{result['speech']} | {result['batch']} | failed: {result['error']} |")
            continue
        cells = [f"hubert-{result['speech']}", result["batch"],
                 f"{result['params_total'] / 1e6:.0f}M / {result['params_trainable'] / 1e6:.0f}M",
                 result["cached_s_per_step"], result["cached_samples_per_s"], result["peak_rss_gib"]]
        cells += [result.get("peak_gpu_gib", "")] * gpu
        if uncached:
            cells += [result["uncached_s_per_step"], f"{result['uncached_s_per_step'] / result['cached_s_per_step']:.1f}x"]
        cells += [result["cache_s_per_image"], result["cache_bytes_per_image"]]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


if __name__ == "__main__":
    main()
