"""Model card and Hub upload for a trained c2f folder.

We upload once, at the end, with `HfApi.upload_folder` rather than `Trainer.push_to_hub`: the latter writes its own
README.md over ours, and the card must carry the retrieval results as `model-index` metadata.
"""

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .pipeline_c2f import TASK
METRIC_NAMES = {"s2i": "speech→image", "i2s": "image→speech"}


def eval_results(results: dict[str, dict[str, float]]) -> list[EvalResult]:
    """`{dataset label: metrics}` -> EvalResults for R@1/5/10 both ways, re-ranked where available."""
    entries = []
    for label, metrics in results.items():
        dataset_name, _, split = label.partition(" ")
        prefix = "reranked_" if "reranked_s2i_R@1" in metrics else ""
        for direction, direction_name in METRIC_NAMES.items():
            for k in (1, 5, 10):
                entries.append(EvalResult(
                    task_type=TASK, task_name="Speech-image retrieval", dataset_type=dataset_name,
                    dataset_name=dataset_name, dataset_split=split.split(" ")[0] or None,
                    metric_type=f"recall@{k}", metric_name=f"{direction_name} R@{k}",
                    metric_value=round(metrics[f"{prefix}{direction}_R@{k}"], 2),
                ))
    return entries


# Names run_retrieval.py resolves itself; anything else that is not a local folder is a Hub dataset id.
LOCAL_DATASETS = {"demo", "demo-shifted", "flickr8k", "spokencoco", "manifest"}
FRAMEWORKS = ("c2f", "torch", "transformers", "accelerate", "datasets")


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (owner/name, not a local path), else None: a card's metadata must not
    carry a path on the trainer's disk."""
    if not name or name in LOCAL_DATASETS or os.path.exists(name) or os.path.isabs(name):
        return None
    return name if name.count("/") == 1 else None


def training_summary(args, global_step: int, momentum_start_step: int) -> dict:
    """What the run actually did, for the card: the queue and distillation are described only if they ran, with the
    step they joined at; a run that ended before `momentum_start_step` says so."""
    def joined(enabled: bool, what: str) -> str | None:
        if not enabled:
            return None
        if global_step <= momentum_start_step:
            return f"{what}: configured to join at step {momentum_start_step}, but the run ended at step {global_step}, so it never ran"
        return f"{what}: from step {momentum_start_step} of {global_step}"
    return dict(
        global_step=global_step,
        queue=joined(args.use_queue, f"embedding queue of {args.queue_size}"),
        queue_ran=args.use_queue and global_step > momentum_start_step,
        distillation=joined(args.use_distillation, f"momentum distillation (EMA {args.momentum}, alpha {args.distill_alpha})"),
        distillation_ran=args.use_distillation and global_step > momentum_start_step,
        sim=args.use_sim,
        sim_negatives_from=(f"the batch and the last {args.sim_queue_negatives} training images"
                            if args.sim_queue_negatives else "the batch")
                           + (", and mirror images of the batch's images" if args.mirror_negatives else ""),
        soft_targets_at=("the online temperature" if args.distill_temperature is None
                         else f"a fixed temperature of {args.distill_temperature}"),
        queue_size=args.queue_size, momentum=args.momentum, distill_alpha=args.distill_alpha,
        hyperparameters={
            "learning_rate": args.learning_rate, "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
            "per_device_train_batch_size": args.per_device_train_batch_size, "world_size": args.world_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps, "optimizer_steps_run": global_step, "seed": args.seed,
            "neighbour_batches": bool(args.neighbour_batches),
            "batch_neighbours": args.batch_neighbours if args.neighbour_batches else None,
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        },
    )


def framework_versions() -> dict[str, str]:
    found = {}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def test_time_views(config) -> str:
    """The config's test-time views in words for the card; empty for one view."""
    views = []
    if config.test_time_speeds:
        views.append("each clip as heard and played at " + ", ".join(f"{speed:g}" for speed in config.test_time_speeds)
                     + " times the speed")
    if config.test_time_image_shift:
        views.append(f"each image as it is and moved {config.test_time_image_shift:g} of its side up, down, left and right")
    return "; ".join(views)


def build_model_card(template: str | Path, repo_id: str, config, results: dict, training: dict, results_table: str,
                     base_models: list[str | None] = (), dataset: str | None = None) -> ModelCard:
    """Fill the model card template from the config, what the training run did (`training_summary`), the results,
    the backbones it started from and the dataset it was trained on."""
    bases = [name for name in map(hub_id, base_models) if name]
    data = ModelCardData(
        library_name="transformers", license="apache-2.0", language="en",
        # The Hub has no speech-image retrieval task; the model's outputs are embeddings for one.
        pipeline_tag="feature-extraction",
        tags=["speech-image-retrieval", "c2f", "hubert", "blip-2", "custom_code"], model_name=repo_id.split("/")[-1],
        base_model=bases or None, datasets=[hub_id(dataset)] if hub_id(dataset) else None,
        eval_results=eval_results(results) or None,
    )
    return ModelCard.from_template(
        data, template_path=str(template), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        speech_backbone=config.speech_config.name_or_path or f"{config.speech_config.hidden_size}-d, {config.speech_config.num_hidden_layers} layers",
        image_backbone=config.vision_config.name_or_path or f"{config.vision_config.hidden_size}-d, {config.vision_config.num_hidden_layers} layers",
        image_frozen=config.freeze_image_backbone, embed_dim=config.embed_dim, k_test=config.k_test,
        test_time_views=test_time_views(config),
        training_data=training.get("training_data", "unknown"), results_table=results_table,
        frameworks=framework_versions(), **{key: value for key, value in training.items() if key != "training_data"},
    )


def ensure_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> HfApi:
    """Create (or find) the Hub repository, or fail with one clear line: called before training, so a missing token or
    network fails in seconds, not after the whole run."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
    except Exception as error:  # httpx, HfHubHTTPError, OfflineModeIsEnabled...: the message is what matters
        raise ValueError(
            f"--push_to_hub: could not create or reach the Hub repository {repo_id!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}). Log in with `hf auth login` or pass "
            "--hub_token, check the network, or drop --push_to_hub."
        ) from error
    return api


def push_folder(folder: str | Path, repo_id: str, card: ModelCard, token: str | None = None, private: bool | None = None) -> str:
    """Write README.md (the card) into `folder` and upload weights, processor, code files and card."""
    folder = Path(folder)
    card.save(folder / "README.md")
    api = ensure_repo(repo_id, token, private)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message="Upload c2f model",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "*.tmp", "image_features*", "runs/**", "training_args.bin"],
    )
    return repo_id
