"""Recall@K for speech-image retrieval, as a local `evaluate` metric.

    import evaluate
    metric = evaluate.load(c2f.metrics.RETRIEVAL_RECALL_PATH)   # a file path: nothing is downloaded
    metric.compute(predictions=similarity_rows, references=query_image_ids, gallery_image_ids=ids)

`predictions[i]` is speech query i's row of scores over the gallery images, `references[i]` that query's image id,
`gallery_image_ids[j]` the id of gallery column j. Image->speech uses the transposed scores: a hit when any caption
of the image is in the top k. Values are percentages; mean and median ranks are 1-based.
"""

import datasets
import evaluate
import torch

from c2f.evaluation import ranking, recall_metrics


class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Zhou & Li, Coarse-to-fine Alignment Makes Better Speech-image Retrieval, arXiv 2408.13119",
            inputs_description=__doc__,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, gallery_image_ids, ks=(1, 5, 10)):
        scores = torch.tensor(predictions, dtype=torch.float32)
        gallery = torch.tensor(gallery_image_ids)
        if scores.shape[1] != len(gallery):
            raise ValueError(f"each prediction row has {scores.shape[1]} scores but gallery_image_ids has {len(gallery)}")
        return recall_metrics(ranking(scores), ranking(scores.t()), torch.tensor(references), gallery, ks=tuple(ks))
