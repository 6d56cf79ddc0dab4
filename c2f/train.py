"""Train and evaluate c2f: `c2f-train [--args]`, `accelerate launch run_retrieval.py [--args]` (the same program), or
either with one JSON/YAML file of arguments.

With no arguments: the tiny model on the shipped demo data, CPU-friendly, then R@1/5/10 both ways on the held-out
test split and a saved model + processor that `AutoModel.from_pretrained(dir, trust_remote_code=True)` loads.
Real backbones and data are flags away, e.g.
`--speech_model facebook/hubert-base-ls960 --image_model Salesforce/blip2-opt-2.7b --dataset flickr8k --data_dir DIR`.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoProcessor, HfArgumentParser, set_seed

from c2f import C2FConfig, C2FProcessor, C2FSpeechImageModel, save_for_pipeline
from c2f.augmentation import ImageAugmentation, SpeechAugmentation
from c2f.data import (SpeechImageCollator, load_speech_image_dataset, validate_records, with_audio_lengths,
                      with_mirror_axes)
from c2f.hub import build_model_card, ensure_repo, push_folder, training_summary
from c2f.presets import tiny_config, tiny_processor
from c2f.training import C2FTrainer, C2FTrainingArguments
from c2f.training.trainer import last_complete_checkpoint
from c2f.training.curves import plot_training_curves
from c2f.training.feature_cache import ImageFeatureCache, SpeechFeatureCache

logger = logging.getLogger("run_retrieval")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A trained c2f folder or Hub id to continue from."})
    speech_model: str | None = field(default=None, metadata={"help": "HuBERT checkpoint, e.g. facebook/hubert-base-ls960."})
    image_model: str | None = field(default=None, metadata={"help": "BLIP-2 checkpoint, e.g. Salesforce/blip2-opt-2.7b."})
    freeze_image_backbone: bool | None = field(default=None, metadata={"help": "Freeze the vision tower (default: frozen for pretrained BLIP-2, as BLIP-2 does; trained for the tiny random model; as recorded in the config when continuing from a c2f model)."})
    freeze_speech_backbone: bool | None = field(default=None, metadata={"help": "Freeze all of HuBERT (default: no; as recorded when continuing from a c2f model)."})
    freeze_speech_feature_encoder: bool | None = field(default=None, metadata={"help": "Freeze HuBERT's convolutional feature encoder only (default: frozen for pretrained HuBERT, trained for the tiny model's log-mel front end; as recorded when continuing)."})
    k_test: int | None = field(default=None, metadata={"help": "SIM re-rank depth stored in the config."})
    speech_frequency_warp: float | None = field(default=None, metadata={"help": "Training-time frequency warp of the log-mel front end, +-this share (tiny model default: 0.1)."})
    test_time_speeds: list[float] | None = field(default=None, metadata={"help": "Inference-time views: speeds at which each clip is also played, its embeddings averaged with the clip's own (tiny model default: 0.9 1.1; 1 for one view). Stored in the config, so the pipeline and the index use them too."})
    test_time_image_shift: float | None = field(default=None, metadata={"help": "Inference-time views: image embeddings averaged with four copies moved this share of the side (tiny model default: 0.03, 2 px; 0 for one view). Stored in the config."})
    config_overrides: str | None = field(default=None, metadata={"help": "Override settings of the tiny model's config, as in the transformers examples: 'log_mel_bins=32,embed_dim=128' (from scratch only)."})


@dataclass
class DataArguments:
    dataset: str = field(default="demo", metadata={"help": "demo, demo-shifted, flickr8k, spokencoco, manifest, or a Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "Release folder (flickr8k, spokencoco) or manifest file."})
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    report_splits: str | None = field(default=None, metadata={"help": "Comma-separated splits evaluated after training besides the test split (default: the eval split; for the demo, validation and validation_unseen_voices)."})
    test_split: str = field(default="test")
    zero_shot_dataset: str | None = field(default=None, metadata={"help": "Also evaluate on another dataset (e.g. demo-shifted)."})
    zero_shot_data_dir: str | None = field(default=None)
    zero_shot_split: str = field(default="test")
    max_audio_seconds: float = field(default=15.0)
    skip_file_check: bool = field(default=False, metadata={"help": "Skip checking every file before training."})
    image_feature_cache: bool = field(default=True, metadata={"help": "Cache frozen image-tower features (safetensors) after one pass."})
    image_cache_dir: str | None = field(default=None, metadata={"help": "Where the feature caches live (default: OUTPUT_DIR/image_features)."})
    speech_feature_cache: bool = field(default=True, metadata={"help": "With --freeze_speech_backbone and no voice augmentation: cache HuBERT's frames per clip after one pass."})
    augment_speech: bool = field(default=True, metadata={"help": "Voice augmentation of training clips (speed perturbation and noise below)."})
    speed_perturbation: float = field(default=0.15, metadata={"help": "Training clips play at a speed drawn from [1 - x, 1 + x]; 0 disables."})
    noise_probability: float = field(default=0.5, metadata={"help": "Share of training clips that get white noise; 0 disables."})
    noise_min_snr_db: float = field(default=10.0, metadata={"help": "Lowest signal-to-noise ratio of that noise (dB)."})
    noise_max_snr_db: float = field(default=30.0, metadata={"help": "Highest signal-to-noise ratio of that noise (dB)."})
    # With neighbour batches, seed 42: held-out-voice validation R@1 63.7 / 73.8 without, 69.6 / 75.0 with.
    image_shift: float = field(default=0.06, metadata={"help": "Training images move by up to this share of their side each way when the vision tower trains (0 disables; off with a frozen tower's feature cache)."})
    decoded_cache_mb: int = field(default=2048, metadata={"help": "Keep decoded training audio and preprocessed images in memory up to this size, so later epochs skip decoding (0: decode every time)."})


@dataclass
class RunArguments(C2FTrainingArguments):
    """Defaults sized for the demo on a laptop CPU; pass the design-card values for real data."""

    evaluation_only: bool = field(default=False, metadata={"help": "Only evaluate (--model_name_or_path) on the test, report and zero-shot splits; no training."})
    output_dir: str = field(default="outputs/c2f-demo", metadata={"help": "Where the model, processor and results go."})
    # 1,320 steps of 32: 7.8 to 9.7 minutes on 2 CPU cores, training and evaluation together, in the runs the README
    # quotes (the 10-minute budget; 24 epochs took 10.6). The model fits its training pairs long before; the
    # extra epochs are for the voices it has not heard, which the augmentation keeps presenting anew.
    num_train_epochs: float = field(default=22.0, metadata={"help": "Training epochs (demo default: 22, 8-10 minutes on 2 CPU cores with evaluation)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Encoding batch size for evaluation."})
    # Chosen on the held-out-voice validation split, 3 seeds each (benchmarks/results/demo_gpu_screen_2026-11-26b.json):
    # 5e-4 -> 2e-3 lifted it from 46.5 / 57.1 to 68.6 / 72.5 S->I / I->S R@1, and the SIM head learns only at the higher
    # rate (its loss stays near the 2:1 label prior at 5e-4 for most of the run). 1e-3 gave 63.4 / 70.5 and 3e-3 the
    # same as 2e-3 (71.2 / 70.0, 2 seeds). With the earlier preset's 0.02 initialisation anything from 4e-4 collapsed.
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (demo default 2e-3; 1e-4 with pretrained backbones)."})
    weight_decay: float = field(default=0.02, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup: a share of all steps when < 1, else a step count."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    queue_size: int = field(default=1024, metadata={"help": "SIC embedding queue length (demo default 1024; 65536 in ALBEF)."})
    # A demo run is a few hundred steps: at 0.995 (a 200-step EMA) the queue and the distillation targets would come
    # from a nearly untrained model for most of it.
    momentum: float = field(default=0.98, metadata={"help": "EMA factor of the momentum model per step (demo default 0.98; 0.995 in ALBEF)."})
    # The towers start random, so the momentum copy is uninformative at first: in-batch SIC (and SIM) for the first
    # two thirds of the run, then the queue and the soft targets (measured with the earlier preset: turned on from
    # step 1, the towers collapsed to chance). The queue fills only in the steps just before it joins.
    momentum_start_epochs: float = field(default=15.0, metadata={"help": "In-batch SIC until this epoch, then the queue and distillation (demo default 15 of 22; 0 with pretrained backbones)."})
    logging_steps: int = field(default=20, metadata={"help": "Log the losses every this many steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints: no, steps or epoch (demo default: none)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Collation workers; 0 keeps the decoded-media cache and exact resume of the augmentation."})
    # A random batch of 32 demo clips holds an image's one-word sibling 4.8% of the time, and in-batch negatives are
    # all SIM learns from. Pairing each clip with a caption neighbour took the held-out-voice validation split from
    # 60.4 / 70.0 to 63.7 / 73.8 R@1 (seed 42), and with the image shifts to 69.6 / 75.0.
    neighbour_batches: bool | None = field(default=None, metadata={"help": "Batches of (clip, clip of a caption-neighbour image) pairs (default: on for the demo, whose captions are text; off elsewhere)."})
    # The nearest caption of a demo scene is, when it has one, its arrangement twin: the same words in another order
    # ("A to the left of B" / "B to the left of A"), TF-IDF cosine 1. Drawn from the nearest 3, a clip whose image has
    # such a twin met it in its batch 27% of the time; from the nearest 1, 58%. With speech positions, seeds 42 / 0 / 1
    # on the held-out-voice validation split: +8.0 R@1 summed over both directions on average (+11.9 / +0.4 / +11.7).
    batch_neighbours: int | None = field(default=None, metadata={"help": "With neighbour batches: a partner image is drawn from this many nearest captions (default: 1 for the demo, 3 elsewhere)."})


def speech_augmentation(data_args: DataArguments, seed: int) -> SpeechAugmentation | None:
    if not data_args.augment_speech:
        return None
    return SpeechAugmentation(
        speed_range=(1 - data_args.speed_perturbation, 1 + data_args.speed_perturbation),
        noise_probability=data_args.noise_probability,
        noise_snr_db=(data_args.noise_min_snr_db, data_args.noise_max_snr_db),
        seed=seed,
    )


def image_augmentation(data_args: DataArguments, image_features, seed: int) -> ImageAugmentation | None:
    """Shifted images when the vision tower runs in training; a frozen tower's cached features stay as they are."""
    if data_args.image_shift <= 0 or image_features is not None:
        return None
    return ImageAugmentation(max_shift=data_args.image_shift, seed=seed + 1)  # draws apart from the voice ones


def resume_point(training_args) -> str | None:
    """`--resume_from_checkpoint true` means the newest *complete* checkpoint of the output folder: one cut short by a
    kill while saving or rotating is passed over, with a warning."""
    wanted = training_args.resume_from_checkpoint
    if wanted is None or str(wanted).lower() not in ("true", "1", "yes"):
        return wanted
    found = last_complete_checkpoint(training_args.output_dir)
    if found is None:
        raise ValueError(f"--resume_from_checkpoint: no complete checkpoint in {training_args.output_dir}")
    newest = max(Path(training_args.output_dir).glob("checkpoint-*"), key=lambda path: path.stat().st_mtime)
    if Path(found) != newest:
        logger.warning("resuming from %s: the newer %s is incomplete", found, newest)
    return found


def report_splits(data_args: DataArguments) -> list[str]:
    """Splits evaluated after training besides the test split. The demo reports both validation splits: the one with
    the training voices and the one with held-out voices, which is the one to select on."""
    if data_args.report_splits is not None:
        return [split for split in data_args.report_splits.split(",") if split]
    if data_args.dataset == "demo":
        return ["validation", "validation_unseen_voices"]
    return [data_args.eval_split]


DEMO_BATCH_NEIGHBOURS = 1  # a demo clip's batch partner comes from its image's nearest caption: see `batch_neighbours`


def apply_dataset_defaults(training_args: RunArguments, data_args: DataArguments) -> None:
    """Sampling defaults that depend on the dataset: the demo's captions are text whose nearest neighbour is the scene
    a pooled embedding confuses, so its batches pair each clip with the nearest; other datasets draw plain batches."""
    demo = data_args.dataset == "demo"
    if training_args.neighbour_batches is None:
        training_args.neighbour_batches = demo
    if training_args.batch_neighbours is None:
        training_args.batch_neighbours = (DEMO_BATCH_NEIGHBOURS if demo
                                          else C2FTrainingArguments.__dataclass_fields__["batch_neighbours"].default)


def use_all_cores_for_a_single_cpu_process():
    """`accelerate launch` sets OMP_NUM_THREADS=1, which halves CPU training speed on a 2-core laptop when only one
    process runs; give that one process the machine's cores."""
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    launched_with_one_thread = os.environ.get("OMP_NUM_THREADS") == "1" and torch.get_num_threads() == 1
    if single_process and not torch.cuda.is_available() and launched_with_one_thread and (os.cpu_count() or 1) > 1:
        torch.set_num_threads(os.cpu_count())
        logger.info("single CPU process: using %d threads", os.cpu_count())


def build_model_and_processor(model_args: ModelArguments):
    """The model and processor the arguments name, with the backbones they say to freeze frozen here, explicitly:
    a loaded model is what was saved, and the defaults below are the training program's choice."""
    overrides = {name: getattr(model_args, name)
                 for name in ("k_test", "speech_frequency_warp", "test_time_speeds", "test_time_image_shift")
                 if getattr(model_args, name) is not None}
    if model_args.config_overrides and (model_args.model_name_or_path or model_args.speech_model or model_args.image_model):
        raise ValueError("--config_overrides changes the tiny model built from scratch; a loaded model keeps its config")
    if model_args.model_name_or_path:
        model = C2FSpeechImageModel.from_pretrained(model_args.model_name_or_path, **overrides)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
        recorded = model.config  # continuing: freeze what the last run froze, unless told otherwise
        defaults = (recorded.freeze_image_backbone, recorded.freeze_speech_backbone, recorded.freeze_speech_feature_encoder)
    elif model_args.speech_model or model_args.image_model:
        if not (model_args.speech_model and model_args.image_model):
            raise ValueError("--speech_model and --image_model go together")
        model = C2FSpeechImageModel.from_backbones(model_args.speech_model, model_args.image_model, **overrides)
        processor = C2FProcessor.from_backbones(model_args.speech_model, model_args.image_model)
        defaults = (True, False, True)  # BLIP-2's frozen tower; HuBERT fine-tuned above its conv front end
    else:
        config = tiny_config(**overrides)
        if model_args.config_overrides:  # transformers' own parser (names must exist, values cast to their types)
            config.update_from_string(model_args.config_overrides)
            config = C2FConfig.from_dict(config.to_dict())  # checked again as a whole
        model, processor = C2FSpeechImageModel(config), tiny_processor(config.vision_config.image_size)
        defaults = (False, False, False)  # random towers: everything trains
    chosen = [default if wanted is None else wanted for wanted, default in zip(
        (model_args.freeze_image_backbone, model_args.freeze_speech_backbone, model_args.freeze_speech_feature_encoder), defaults)]
    model.freeze_backbones(image=chosen[0], speech=chosen[1], speech_feature_encoder=chosen[2])
    return model, processor


def recall_cells(metrics: dict[str, float], prefix: str = "") -> list[str]:
    """"R@1 / R@5 / R@10" for speech->image and image->speech."""
    return [" / ".join(f"{metrics[f'{prefix}{d}_R@{k}']:.1f}" for k in (1, 5, 10)) for d in ("s2i", "i2s")]


def format_results(results: dict[str, dict[str, float]]) -> str:
    lines = ["| eval | ranking | S→I R@1 / R@5 / R@10 | I→S R@1 / R@5 / R@10 |", "|---|---|---|---|"]
    for name, metrics in results.items():
        for label, prefix in (("coarse (SIC)", ""), ("re-ranked (SIM)", "reranked_")):
            if f"{prefix}s2i_R@1" not in metrics:
                continue
            cells = recall_cells(metrics, prefix)
            lines.append(f"| {name} | {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        model_args, data_args, training_args = loader(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    use_all_cores_for_a_single_cpu_process()

    apply_dataset_defaults(training_args, data_args)
    if not training_args.use_sim and model_args.k_test is None and not training_args.evaluation_only:
        # An untrained SIM head would re-rank at random in evaluation, in the pipeline and in the index: the saved
        # model ranks by SIC alone unless --k_test asks otherwise.
        logger.info("--use_sim false: the model is saved with k_test=0 (SIC ranking only)")
        model_args.k_test = 0
    # Seeded before the model is built, so --seed fixes the initialisation too (Trainer seeds only later).
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(model_args)

    def load(dataset, data_dir, split):
        records = load_speech_image_dataset(dataset, split, data_dir)
        if not data_args.skip_file_check:  # clips shorter than the model's receptive field count as bad
            validate_records(records, f"{dataset} {split}", min_audio_samples=model.config.min_audio_samples)
        return records

    # Training runs unless the user asks for evaluation only: transformers turns do_eval on by itself whenever an
    # eval strategy is set, so do_train/do_eval cannot say it.
    train = None if training_args.evaluation_only else load(data_args.dataset, data_args.data_dir, data_args.train_split)
    evaluation = load(data_args.dataset, data_args.data_dir, data_args.eval_split)
    # Every split the run reports is loaded and checked now: a bad test file must fail before training, not after.
    evaluations = [(load(data_args.dataset, data_args.data_dir, data_args.test_split), f"{data_args.dataset} {data_args.test_split}", "test")]
    for split in report_splits(data_args):
        if split == data_args.test_split:
            continue
        dataset = evaluation if split == data_args.eval_split else load(data_args.dataset, data_args.data_dir, split)
        evaluations.append((dataset, f"{data_args.dataset} {split}", split))
    if data_args.zero_shot_dataset:
        evaluations.append((load(data_args.zero_shot_dataset, data_args.zero_shot_data_dir, data_args.zero_shot_split),
                            f"{data_args.zero_shot_dataset} {data_args.zero_shot_split} (zero-shot)", "zero_shot"))
    if train is not None and training_args.mirror_negatives and training_args.use_sim:
        train = with_mirror_axes(train, data_args.dataset)
    if train is not None and training_args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
        train = with_audio_lengths(train, training_args.length_column_name)
    image_features = None
    cache_dir = data_args.image_cache_dir or f"{training_args.output_dir}/image_features"
    if train is not None and "vision_model" in model.frozen_modules and data_args.image_feature_cache:
        with training_args.main_process_first(desc="image feature cache"):
            image_features = ImageFeatureCache.build(model.vision_model, processor, train, cache_dir, tag=f"{data_args.dataset}-{data_args.train_split}")
    speech_features = None
    if train is not None and "speech_model" in model.frozen_modules and data_args.speech_feature_cache:
        if data_args.augment_speech:
            logger.warning("HuBERT feature cache off: voice augmentation changes the clips every epoch "
                           "(--augment_speech false caches the frozen HuBERT's frames)")
        else:
            with training_args.main_process_first(desc="speech feature cache"):
                speech_features = SpeechFeatureCache.build(model, processor, train, cache_dir, tag=f"{data_args.dataset}-{data_args.train_split}")
    # c2f uploads once at the end with its own model card; Trainer's push would overwrite README.md.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    if push_to_hub and training_args.process_index == 0:
        ensure_repo(repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
    trainer = C2FTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=SpeechImageCollator(processor, data_args.max_audio_seconds, image_features,
                                          augmentation=None if speech_features is not None else speech_augmentation(data_args, training_args.draw_seed),
                                          decoded_cache_bytes=data_args.decoded_cache_mb * 2**20, speech_features=speech_features,
                                          image_augmentation=image_augmentation(data_args, image_features, training_args.draw_seed)),
        processor=processor,
    )
    if train is not None:
        train_result = trainer.train(resume_from_checkpoint=resume_point(training_args))
        trainer.save_metrics("train", train_result.metrics)  # train_results.json + all_results.json, as the examples do
        trainer.save_state()  # trainer_state.json: the whole log history, loss parts included
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:  # sharded weights: Trainer gathers them
            trainer.save_model(training_args.output_dir)
        if trainer.is_world_process_zero():  # model + processor + pipeline code, once, for pipeline(..., model=DIR)
            save_for_pipeline(trainer.accelerator.unwrap_model(trainer.model), processor, training_args.output_dir)

    def retrieval_metrics(dataset, label, prefix):
        metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
        return label, {name.removeprefix(f"{prefix}_"): value for name, value in metrics.items()}

    results = dict(retrieval_metrics(*evaluation) for evaluation in evaluations)
    if trainer.is_world_process_zero():
        table = format_results(results)
        print(table)
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(f"{training_args.output_dir}/retrieval_results.json", "w") as handle:
            json.dump(results, handle, indent=2)
        if train is not None:
            curves = plot_training_curves(trainer.state.log_history, results, f"{training_args.output_dir}/training_curves.png")
            print(f"training curves: {curves}")
        if push_to_hub:
            training = training_summary(training_args, trainer.state.global_step,
                                        int(trainer.optimizer_steps(training_args.momentum_start_epochs)) if train is not None else 0)
            training["training_data"] = (f"`{data_args.dataset}` split `{data_args.train_split}` "
                                         f"({len(train) if train is not None else 0} captions).")
            card = build_model_card(Path(__file__).with_name("model_card.md"), repo_id, model.config, results, training,
                                    table, base_models=[model_args.speech_model, model_args.image_model,
                                                        model_args.model_name_or_path], dataset=data_args.dataset)
            push_folder(training_args.output_dir, repo_id, card, token=training_args.hub_token, private=training_args.hub_private_repo)
            print(f"pushed to {repo_id}")
    return results


def entry_point() -> None:
    """`c2f-train`: a console script exits with what its function returns, and `main` returns the results."""
    main()


if __name__ == "__main__":
    main()
