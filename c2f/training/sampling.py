"""Training batches that pair each image with a near neighbour, so SIC and SIM meet hard negatives in every batch.

In-batch negatives are all SIM ever sees (ALBEF mines its hard negatives from the batch), and a random batch of 32
demo clips holds the one-word-different sibling of an image 4.8% of the time (`benchmarks/demo_errors.py`). Here half
of each batch is random anchors and the other half, one for each anchor, a clip of an image whose caption is among the
anchor image's nearest by TF-IDF cosine: the scenes a pooled embedding confuses arrive together.
"""

import math
import re
import warnings
from collections import Counter

import torch
from torch.utils.data import Sampler


def caption_neighbours(captions_by_image: dict[int, list[str]], count: int, block: int = 512) -> dict[int, list[int]]:
    """For each image, the `count` other images whose captions (all of an image's, pooled) are nearest in TF-IDF cosine.

    Ties go to the lower image id, so the result depends on the data alone."""
    images = sorted(captions_by_image)
    words = [Counter(re.findall(r"[a-z0-9']+", " ".join(captions_by_image[i]).lower())) for i in images]
    document_frequency = Counter(word for bag in words for word in bag)
    vocabulary = {word: index for index, word in enumerate(sorted(document_frequency))}
    rows, cols, values = [], [], []
    for row, bag in enumerate(words):
        for word, times in bag.items():
            rows.append(row)
            cols.append(vocabulary[word])
            values.append(times * math.log(len(images) / document_frequency[word]))
    matrix = torch.sparse_coo_tensor([rows, cols], torch.tensor(values, dtype=torch.float32),
                                     (len(images), len(vocabulary)), check_invariants=True).coalesce()
    norms = torch.zeros(len(images)).index_add_(0, matrix.indices()[0], matrix.values() ** 2).sqrt().clamp_min(1e-12)
    matrix = torch.sparse_coo_tensor(matrix.indices(), matrix.values() / norms[matrix.indices()[0]], matrix.shape,
                                     check_invariants=True)
    count = min(count, len(images) - 1)
    neighbours = {}
    for start in range(0, len(images), block):
        stop = min(start + block, len(images))
        rows_t = matrix.index_select(0, torch.arange(start, stop)).t()  # sparse [vocabulary, block]
        with warnings.catch_warnings():  # torch calls its sparse products beta
            warnings.simplefilter("ignore", UserWarning)
            scores = torch.sparse.mm(matrix, rows_t).to_dense().t()  # [block, images], never all images squared at once
        scores[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf  # not its own neighbour
        # Stable descending sort: equal scores keep image-id order.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
        for offset, picked in enumerate(order.tolist()):
            neighbours[images[start + offset]] = [images[j] for j in picked]
    return neighbours


class NeighbourBatchSampler(Sampler[int]):
    """Row indices in batches of `batch_size`: pairs (anchor row, row of a caption-neighbour image of the anchor).

    An epoch has as many rows as the dataset: half of them anchors (a fresh random half each epoch), each followed by
    its partner. Seeded by `seed` and the epoch (`set_epoch`, which Trainer calls), so a resumed run draws the same
    batches. Pairs never straddle two batches or two ranks when the per-process batch size is even.
    """

    def __init__(self, image_ids: list[int], captions: list[str], batch_size: int, seed: int = 0, neighbours: int = 3):
        if batch_size % 2:
            raise ValueError(f"neighbour batches need an even per-device batch size, got {batch_size}")
        if not any(caption.strip() for caption in captions):
            raise ValueError("neighbour batches pair images by their caption text, and this dataset's `caption` column "
                             "is empty (Flickr8k's audio release has none): train without --neighbour_batches")
        self.seed = seed
        self.epoch = 0
        self.image_ids = [int(i) for i in image_ids]
        self.rows_by_image: dict[int, list[int]] = {}
        captions_by_image: dict[int, list[str]] = {}
        for row, (image, caption) in enumerate(zip(self.image_ids, captions)):
            self.rows_by_image.setdefault(image, []).append(row)
            captions_by_image.setdefault(image, []).append(caption)
        if len(self.rows_by_image) < 2:
            raise ValueError("neighbour batches need at least two images")
        self.neighbours = caption_neighbours(captions_by_image, neighbours)
        self.num_pairs = len(self.image_ids) // 2

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 2 * self.num_pairs

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        anchors = torch.randperm(len(self.image_ids), generator=generator)[: self.num_pairs].tolist()
        picks = torch.rand(self.num_pairs, 2, generator=generator).tolist()
        for anchor, (neighbour_draw, row_draw) in zip(anchors, picks):
            candidates = self.neighbours[self.image_ids[anchor]]
            partner_rows = self.rows_by_image[candidates[int(neighbour_draw * len(candidates))]]
            yield anchor
            yield partner_rows[int(row_draw * len(partner_rows))]
