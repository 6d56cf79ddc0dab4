"""Which test-time views help trained demo models: each model scored with one view, speed views, image-shift views and
both, on the held-out-voice validation split (where the choice is made) and the test split.

    python benchmarks/demo_test_time_views.py outputs/c2f-demo outputs/ablation/full/seed-0 ... [--json out.json]

Only the config's `test_time_speeds` and `test_time_image_shift` change between rows; the weights stay. R@1 of the
coarse (SIC) ranking, speech->image / image->speech, per model and averaged over the models given, with the sum of
both directions that the choice compares.
"""

import argparse
import json
from statistics import mean

import torch

from c2f.data import load_demo
from c2f.evaluation import encode_for_retrieval, ranking, recall_metrics
from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.processing_c2f import C2FProcessor

SPEEDS = (0.9, 1.1)
VARIANTS = {
    "one view": dict(test_time_speeds=(), test_time_image_shift=0.0),
    "speeds": dict(test_time_speeds=SPEEDS, test_time_image_shift=0.0),
    "image shifts": dict(test_time_speeds=(), test_time_image_shift=0.03),
    "speeds + image shifts (the preset)": dict(test_time_speeds=SPEEDS, test_time_image_shift=0.03),
}
SPLITS = ("validation_unseen_voices", "test")


@torch.no_grad()
def score(model, processor, dataset) -> tuple[float, float]:
    encoded = encode_for_retrieval(model, dataset, processor, batch_size=64, progress=False)
    coarse = encoded["speech_embeds"] @ encoded["image_embeds"].t()
    metrics = recall_metrics(ranking(coarse), ranking(coarse.t()), encoded["speech_image_ids"], encoded["gallery_image_ids"])
    return round(metrics["s2i_R@1"], 1), round(metrics["i2s_R@1"], 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="trained c2f folders (the demo's tiny model)")
    parser.add_argument("--json", help="also write every model's numbers here")
    args = parser.parse_args()
    datasets = {split: load_demo(split) for split in SPLITS}
    results = {}
    for path in args.models:
        model, processor = C2FSpeechImageModel.from_pretrained(path).eval(), C2FProcessor.from_pretrained(path)
        results[path] = {}
        for name, settings in VARIANTS.items():
            for field, value in settings.items():
                setattr(model.config, field, value)
            results[path][name] = {split: score(model, processor, datasets[split]) for split in SPLITS}
            print(path, name, json.dumps(results[path][name]), flush=True)
    print(f"\nR@1 S->I / I->S (sum), mean of {len(results)} model(s)")
    print("| views | held-out voices (validation) | test |\n|---|---|---|")
    for name in VARIANTS:
        cells = []
        for split in SPLITS:
            s2i, i2s = (mean(results[path][name][split][d] for path in results) for d in (0, 1))
            cells.append(f"{s2i:.1f} / {i2s:.1f} ({s2i + i2s:.1f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
