"""Model card and Hub upload for a trained c2f folder.

We upload once, at the end, with `HfApi.upload_folder` rather than `Trainer.push_to_hub`: the latter writes its own
README.md over ours, and the card must carry the retrieval results as `model-index` metadata.
"""

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


def build_model_card(template: str | Path, repo_id: str, config, results: dict, training: dict, results_table: str) -> ModelCard:
    """Fill the model card template from the config, training settings and results."""
    data = ModelCardData(
        library_name="transformers", license="apache-2.0", language="en", pipeline_tag=None,
        tags=["speech-image-retrieval", "c2f", "hubert", "blip-2", "custom_code"], model_name=repo_id.split("/")[-1],
        datasets=sorted({label.split(" ")[0] for label in results}), eval_results=eval_results(results) or None,
    )
    return ModelCard.from_template(
        data, template_path=str(template), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        speech_backbone=config.speech_config.name_or_path or f"{config.speech_config.hidden_size}-d, {config.speech_config.num_hidden_layers} layers",
        image_backbone=config.vision_config.name_or_path or f"{config.vision_config.hidden_size}-d, {config.vision_config.num_hidden_layers} layers",
        image_frozen=config.freeze_image_backbone, embed_dim=config.embed_dim, k_test=config.k_test,
        queue_size=training.get("queue_size"), momentum=training.get("momentum"), distill_alpha=training.get("distill_alpha"),
        training_data=training.get("training_data", "unknown"), results_table=results_table,
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
