"""Retrieval evaluation: Recall@K both ways and mean/median rank, coarse (SIC) and re-ranked (SIM)."""

import torch
from tqdm.auto import tqdm
from datasets import Dataset
from torch.utils.data import DataLoader

from .data import SpeechImageCollator, first_row_of_each_image
from .modeling_c2f import C2FSpeechImageModel
from .processing_c2f import C2FProcessor


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """`[queries, candidates]` scores -> candidate columns, best first (ties keep column order)."""
    return scores.float().argsort(dim=1, descending=True, stable=True)


def ranks_of_first_hit(order: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-ranked correct item in each row of `order` (columns best first); `hits[row, col]`
    marks correct items."""
    hit_in_order = torch.gather(hits.to(order.device), 1, order)
    if not bool(hit_in_order.any(dim=1).all()):
        raise ValueError("every query needs at least one correct item in the gallery")
    return hit_in_order.float().argmax(dim=1) + 1


def recall_metrics(
    speech_to_image: torch.Tensor, image_to_speech: torch.Tensor, speech_image_ids: torch.Tensor, gallery_image_ids: torch.Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """Rankings `speech_to_image` [speech, images] and `image_to_speech` [images, speech] (candidate columns best
    first: `ranking(scores)`, or `C2FSpeechImageModel.rerank(...).order`) -> R@k (percent), mean and median rank.
    Image->speech counts a hit when any caption of the image is in the top k."""
    hits = speech_image_ids.view(-1, 1) == gallery_image_ids.view(1, -1)
    metrics = {}
    for direction, order, direction_hits in (("s2i", speech_to_image, hits), ("i2s", image_to_speech, hits.t())):
        ranks = ranks_of_first_hit(order, direction_hits)
        for k in ks:
            metrics[f"{direction}_R@{k}"] = 100.0 * (ranks <= k).float().mean().item()
        metrics[f"{direction}_mean_rank"] = ranks.float().mean().item()
        metrics[f"{direction}_median_rank"] = ranks.float().median().item()
    return metrics


@torch.no_grad()
def encode_for_retrieval(model: C2FSpeechImageModel, dataset: Dataset, processor: C2FProcessor, batch_size: int = 32,
                         progress: bool = True):
    """Embeddings and SIM tokens for every caption and every distinct image of `dataset`."""
    device = next(model.parameters()).device
    collator = SpeechImageCollator(processor)
    first_of_image = first_row_of_each_image(dataset)
    speech, images = [], []
    for rows, sink, encode in (
        (range(len(dataset)), speech, lambda b: model.encode_speech(b["input_values"].to(device), b["attention_mask"].to(device))),
        (list(first_of_image.values()), images, lambda b: model.encode_image(b["pixel_values"].to(device))),
    ):
        loader = DataLoader(dataset.select(rows), batch_size=batch_size, collate_fn=collator)
        what = "captions" if sink is speech else "images"
        for batch in tqdm(loader, desc=f"encoding {len(rows)} {what}", leave=False, disable=not progress):
            sink.append(encode(batch))
    speech_embeds = torch.cat([o.speech_embeds for o in speech])
    # Speech token sequences differ in length across batches: keep them per batch and pad on use.
    speech_tokens = [(o.speech_tokens, o.speech_token_mask) for o in speech]
    return dict(
        speech_embeds=speech_embeds,
        speech_tokens=speech_tokens,
        image_embeds=torch.cat([o.image_embeds for o in images]),
        image_tokens=torch.cat([o.image_tokens for o in images]),
        speech_image_ids=torch.tensor([int(i) for i in dataset["image_id"]]),
        gallery_image_ids=torch.tensor(list(first_of_image)),
    )


def _flat_speech_tokens(chunks):
    length = max(tokens.shape[1] for tokens, _ in chunks)
    padded, masks = [], []
    for tokens, mask in chunks:
        pad = length - tokens.shape[1]
        padded.append(torch.nn.functional.pad(tokens, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(mask, (0, pad), value=False))
    return torch.cat(padded), torch.cat(masks)


@torch.no_grad()
def evaluate_retrieval(model, dataset: Dataset, processor, rerank_k: int | None = None, batch_size: int = 32,
                       progress: bool = True) -> dict[str, float]:
    """Coarse (SIC) metrics, and SIM re-ranked metrics (prefixed `reranked_`) when `rerank_k` > 0."""
    was_training = model.training
    model.eval()
    encoded = encode_for_retrieval(model, dataset, processor, batch_size, progress)
    coarse = encoded["speech_embeds"] @ encoded["image_embeds"].t()
    metrics = recall_metrics(ranking(coarse), ranking(coarse.t()), encoded["speech_image_ids"], encoded["gallery_image_ids"])
    rerank_k = model.config.k_test if rerank_k is None else rerank_k
    if rerank_k > 0:
        speech_tokens, speech_mask = _flat_speech_tokens(encoded["speech_tokens"])
        args = (speech_tokens, speech_mask, encoded["image_tokens"], rerank_k)
        s2i = model.rerank(coarse, *args, queries_are_speech=True).order
        i2s = model.rerank(coarse.t().contiguous(), *args, queries_are_speech=False).order
        fine = recall_metrics(s2i, i2s, encoded["speech_image_ids"], encoded["gallery_image_ids"])
        metrics.update({f"reranked_{name}": value for name, value in fine.items()})
    model.train(was_training)
    return metrics
