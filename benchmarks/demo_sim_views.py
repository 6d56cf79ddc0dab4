"""Can re-ranking be made to help on voices the model never heard? Each trained demo model's top candidates (coarse
ranking with the model's own views) are re-scored by SIM logit margin x w + cosine / temperature, with the margin of
one view (what `rerank` does, w = 1, top 16) or averaged over the clip's speed views, the image's shifted views, or
every pairing of the two; for w in 1, 0.5, 0.25 and the top 16 or 4. Printed on the held-out-voice validation split
(where a choice is made) and the test split.

    python benchmarks/demo_sim_views.py outputs/c2f-demo outputs/s0 ... [--json out.json]

The views are the model config's `test_time_speeds` and `test_time_image_shift` (the tiny preset's 0.9, 1.1 and
2 px). R@1 speech->image / image->speech, per model and averaged over the models given.
"""

import torch
from torch.utils.data import DataLoader

from c2f.data import SpeechImageCollator, first_row_of_each_image
from c2f.evaluation import _flat_speech_tokens, ranking, recall_metrics
from c2f.modeling_c2f import change_speed
from demo_test_time_views import rescore_from_command_line  # this folder is on the path when a script in it runs

VIEWS = {  # name: (speech views used by SIM, image views used by SIM); "all" = every pairing of the two
    "one view": ("one", "one"),
    "speed views": ("all", "one"),
    "shift views": ("one", "all"),
    "speed x shift views": ("all", "all"),
}
WEIGHTS = (1.0, 0.5, 0.25)  # 1, top 16 (the model's k_test) is `rerank` today
DEPTHS = (16, 4)


@torch.no_grad()
def view_tokens(model, processor, dataset):
    """Coarse scores (with the model's views), and SIM tokens per view: speech `[views] -> (tokens, mask)` for
    speeds (1, *test_time_speeds), images `[views] -> tokens` for the unshifted image and its shifted copies."""
    first = first_row_of_each_image(dataset)
    collator = SpeechImageCollator(processor)
    speeds = (1.0, *model.config.test_time_speeds)
    speech_embeds, speech_chunks = [], [[] for _ in speeds]
    for batch in DataLoader(dataset, batch_size=64, collate_fn=collator):
        values, mask = batch["input_values"], batch["attention_mask"]
        speech_embeds.append(model.get_speech_features(values, mask))
        for view, speed in enumerate(speeds):
            inputs = (values, mask) if speed == 1.0 else change_speed(values, mask, speed, model.config.min_audio_samples)
            out = model.encode_speech(*inputs, average_views=False)
            speech_chunks[view].append((out.speech_tokens, out.speech_token_mask))
    image_embeds, image_tokens = [], None
    for batch in DataLoader(dataset.select(list(first.values())), batch_size=64, collate_fn=collator):
        pixels = batch["pixel_values"]
        image_embeds.append(model.get_image_features(pixels))
        views = [pixels] + model.image_views(pixels)
        tokens = [model.encode_image(view, average_views=False).image_tokens for view in views]
        image_tokens = tokens if image_tokens is None else [torch.cat([a, b]) for a, b in zip(image_tokens, tokens)]
    coarse = torch.cat(speech_embeds) @ torch.cat(image_embeds).t()
    ids = torch.tensor([int(i) for i in dataset["image_id"]]), torch.tensor(list(first))
    return coarse, [_flat_speech_tokens(chunks) for chunks in speech_chunks], image_tokens, ids


def mean_margins(model, coarse, speech_views, image_views, k, queries_are_speech):
    """SIM logit margins of each row's top-`k` candidates (NaN elsewhere), averaged over every (speech view, image
    view) pair given."""
    temperature = model.get_temperature().float()
    return torch.stack([
        model.rerank(coarse, tokens, mask, image, k, queries_are_speech=queries_are_speech).fine_scores - coarse / temperature
        for tokens, mask in speech_views for image in image_views
    ]).mean(dim=0)


def fused_order(model, coarse, margins, weight, k):
    """`rerank`'s order, with the SIM margin weighted by `weight` (1 in `rerank`) and only the top `k` re-scored."""
    fine = weight * margins + coarse / model.get_temperature().float()
    coarse_order = coarse.argsort(dim=1, descending=True, stable=True)
    top = coarse_order[:, :k]
    by_fine = top.gather(1, fine.gather(1, top).argsort(dim=1, descending=True, stable=True))
    return torch.cat([by_fine, coarse_order[:, k:]], dim=1)


def scores_of_split(model, processor, dataset):
    coarse, speech_views, image_views, (speech_ids, gallery_ids) = view_tokens(model, processor, dataset)
    k = max(DEPTHS)
    results = {"coarse": recall_metrics(ranking(coarse), ranking(coarse.t()), speech_ids, gallery_ids)}
    for name, (speech_use, image_use) in VIEWS.items():
        speech = speech_views if speech_use == "all" else speech_views[:1]
        images = image_views if image_use == "all" else image_views[:1]
        margins = (mean_margins(model, coarse, speech, images, k, True),
                   mean_margins(model, coarse.t().contiguous(), speech, images, k, False))
        for weight in WEIGHTS:
            for depth in DEPTHS:
                s2i = fused_order(model, coarse, margins[0], weight, depth)
                i2s = fused_order(model, coarse.t().contiguous(), margins[1], weight, depth)
                results[f"{name}, margin x {weight}, top {depth}"] = recall_metrics(s2i, i2s, speech_ids, gallery_ids)
    return {name: (round(m["s2i_R@1"], 1), round(m["i2s_R@1"], 1)) for name, m in results.items()}


def main():
    rescore_from_command_line(__doc__, scores_of_split, "ranking")


if __name__ == "__main__":
    main()
