"""Where a trained demo model goes wrong, and what its SIM head could fix: run on a c2f folder.

    python benchmarks/demo_errors.py outputs/c2f-demo [--split test] [--k 16]

Prints, on one demo split: the share of coarse (SIC) speech->image top-1 errors that pick a *sibling* of the right
image (a scene whose caption differs in one word, or has the same words in another order: colours or objects
swapped), how often SIC and SIM each put the right image above such a sibling when both are in the top k, and how
often a training batch offers SIM a sibling as a negative at all (in-batch hard negatives are all it ever sees), drawn
at random and drawn as the demo's neighbour batches.

Then the same errors and pairs by what tells the two scenes apart (`scene_difference`): the arrangement alone (the
same objects, placed otherwise: "A to the left of B" against "B to the left of A" or "B above A"), the number of
objects, or the objects themselves. `--rows N` keeps the split's first N clips (the training split has 1,920).
"""

import argparse
from collections import Counter

import torch

from c2f.data import load_demo
from c2f.demo.scenes import OBJECT_PHRASE
from c2f.evaluation import _flat_speech_tokens, encode_for_retrieval
from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.processing_c2f import C2FProcessor


def are_siblings(first: str, second: str) -> bool:
    a, b = first.split(), second.split()
    if a == b or len(a) != len(b):
        return False
    return sum(x != y for x, y in zip(a, b)) == 1 or sorted(a) == sorted(b)


DIFFERENCES = ("arrangement", "object count", "objects")


def scene_difference(first: str, second: str) -> str:
    """What tells two demo scenes apart, from their captions: "arrangement" (the same objects, placed otherwise),
    "object count", or "objects" (at least one object's size, colour or shape)."""
    a, b = OBJECT_PHRASE.findall(first), OBJECT_PHRASE.findall(second)
    if len(a) != len(b):
        return "object count"
    return "arrangement" if sorted(a) == sorted(b) else "objects"


def captions_by_image(dataset) -> dict[int, str]:
    return {int(image_id): caption for image_id, caption in zip(dataset["image_id"], dataset["caption"])}


def sibling_share_in_batches(dataset, batch_size: int) -> tuple[float, float]:
    """(share of training images with a sibling in training, chance that a random batch holds that sibling)."""
    captions = captions_by_image(dataset)
    siblings = {i: [j for j, other in captions.items() if j != i and are_siblings(text, other)] for i, text in captions.items()}
    with_sibling = sum(bool(s) for s in siblings.values()) / len(captions)
    rows, per_image = len(dataset), len(dataset) / len(captions)
    # The other batch_size - 1 rows are drawn from rows - 1; the sibling owns per_image of them.
    miss = 1.0
    for draw in range(batch_size - 1):
        miss *= 1 - per_image / (rows - 1 - draw)
    return with_sibling, 1 - miss


def sibling_share_in_neighbour_batches(dataset, batch_size: int, epochs: int = 3) -> float:
    """The same odds, counted over a few epochs of the `NeighbourBatchSampler` the demo trains with."""
    from c2f.train import DEMO_BATCH_NEIGHBOURS
    from c2f.training.sampling import NeighbourBatchSampler

    captions = captions_by_image(dataset)
    image_ids = dataset["image_id"]
    sampler = NeighbourBatchSampler(image_ids, dataset["caption"], batch_size, seed=0, neighbours=DEMO_BATCH_NEIGHBOURS)
    hits = total = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        rows = list(sampler)
        for start in range(0, len(rows), batch_size):
            batch = [int(image_ids[row]) for row in rows[start : start + batch_size]]
            for image in batch:
                hits += any(other != image and are_siblings(captions[image], captions[other]) for other in batch)
                total += 1
    return hits / total


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="training batch size, for the in-batch sibling odds")
    parser.add_argument("--rows", type=int, default=None, help="keep the split's first N clips")
    args = parser.parse_args()
    model = C2FSpeechImageModel.from_pretrained(args.model).eval()
    processor = C2FProcessor.from_pretrained(args.model)
    dataset = load_demo(args.split)
    if args.rows is not None:
        dataset = dataset.select(range(min(args.rows, len(dataset))))
    encoded = encode_for_retrieval(model, dataset, processor, 64)
    coarse = encoded["speech_embeds"] @ encoded["image_embeds"].t()
    gallery = encoded["gallery_image_ids"].tolist()
    captions = captions_by_image(dataset)
    truth = encoded["speech_image_ids"].tolist()
    top = coarse.topk(args.k, dim=1).indices
    speech_tokens, speech_mask = _flat_speech_tokens(encoded["speech_tokens"])

    errors, pairs, by_difference = Counter(), Counter(), Counter()
    for query, right in enumerate(truth):
        best = gallery[int(top[query, 0])]
        if best != right:
            errors["sibling" if are_siblings(captions[right], captions[best]) else "other"] += 1
            by_difference["errors", scene_difference(captions[right], captions[best])] += 1
        candidates = [gallery[int(col)] for col in top[query]]
        if right not in candidates:
            continue
        right_col = int(top[query, candidates.index(right)])
        columns = top[query].tolist()
        logits = model.match_logits(speech_tokens[[query] * len(columns)], speech_mask[[query] * len(columns)],
                                    encoded["image_tokens"][columns])
        margins = dict(zip(columns, (logits[:, 1] - logits[:, 0]).tolist()))
        for col, image_id in zip(columns, candidates):
            if image_id == right:
                continue
            difference = scene_difference(captions[right], captions[image_id])
            by_difference["pairs", difference] += 1
            by_difference["sic", difference] += int(coarse[query, right_col] > coarse[query, col])
            by_difference["sim", difference] += int(margins[right_col] > margins[col])
            if not are_siblings(captions[right], captions[image_id]):
                continue
            pairs["total"] += 1
            pairs["sic"] += int(coarse[query, right_col] > coarse[query, col])
            pairs["sim"] += int(margins[right_col] > margins[col])
    total_errors = sum(errors.values())
    with_sibling, in_batch = sibling_share_in_batches(load_demo("train"), args.batch)
    print(f"| demo {args.split}, coarse S→I | value |")
    print("|---|---|")
    print(f"| queries | {len(truth)} |")
    print(f"| top-1 errors | {total_errors} ({100 * total_errors / len(truth):.1f}%) |")
    print(f"| of which a sibling of the right image | {errors['sibling']} ({100 * errors['sibling'] / max(total_errors, 1):.0f}%) |")
    print(f"| (right, sibling) pairs both in the top {args.k} | {pairs['total']} |")
    print(f"| SIC ranks the right one higher | {100 * pairs['sic'] / max(pairs['total'], 1):.0f}% |")
    print(f"| SIM ranks the right one higher | {100 * pairs['sim'] / max(pairs['total'], 1):.0f}% |")
    print(f"| training images with a sibling in training | {100 * with_sibling:.0f}% |")
    print(f"| chance a random batch of {args.batch} holds that sibling (SIM's only source of such negatives) | {100 * in_batch:.1f}% |")
    neighbour = sibling_share_in_neighbour_batches(load_demo("train"), args.batch)
    print(f"| share of clips whose neighbour batch (the demo default) holds a sibling of their image | {100 * neighbour:.1f}% |")
    images = encoded["image_embeds"]
    twins, others = [], []
    for first in range(len(gallery)):
        for second in range(first + 1, len(gallery)):
            a, b = captions[gallery[first]], captions[gallery[second]]
            if len(OBJECT_PHRASE.findall(a)) > 1:
                (twins if scene_difference(a, b) == "arrangement" else others).append(float(images[first] @ images[second]))
    if twins:
        print(f"| image embedding cosine, arrangement twins (same objects placed otherwise) / other pairs | "
              f"{sum(twins) / len(twins):.3f} ({len(twins)} pairs) / {sum(others) / len(others):.3f} |")
    print()
    print(f"| demo {args.split}: what tells the right image from the other | top-1 errors (coarse S→I) | "
          f"(right, other) pairs in the top {args.k} | SIC ranks the right one higher | SIM ranks it higher |")
    print("|---|---|---|---|---|")
    for difference in DIFFERENCES:
        count = max(by_difference["pairs", difference], 1)
        print(f"| {difference} | {by_difference['errors', difference]} ({100 * by_difference['errors', difference] / max(total_errors, 1):.0f}%) "
              f"| {by_difference['pairs', difference]} | {100 * by_difference['sic', difference] / count:.0f}% "
              f"| {100 * by_difference['sim', difference] / count:.0f}% |")


if __name__ == "__main__":
    main()
