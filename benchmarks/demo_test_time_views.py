"""Which test-time views help trained demo models: each model scored with one view, speed views, image-shift views and
both, on the held-out-voice validation split (where the choice is made) and the test split.

    python benchmarks/demo_test_time_views.py outputs/c2f-demo outputs/ablation/full/seed-0 ... [--json out.json]

Only the config's `test_time_speeds` and `test_time_image_shift` change between rows; the weights stay, and every
embedding comes from the model's own `get_speech_features` / `get_image_features`. R@1 of the
coarse (SIC) ranking, speech->image / image->speech, per model and averaged over the models given, with the sum of
both directions that the choice compares.
"""

import argparse
import json
from statistics import mean

import torch
from torch.utils.data import DataLoader

from c2f.data import SpeechImageCollator, first_row_of_each_image, load_demo
from c2f.evaluation import ranking, recall_metrics
from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.processing_c2f import C2FProcessor

SPEECH = {"one view": (), "speeds 0.9, 1.1": (0.9, 1.1), "speeds 0.9, 0.95, 1.05, 1.1": (0.9, 0.95, 1.05, 1.1)}
IMAGE = {"one view": 0.0, "moved 2 px four ways": 0.03}
VARIANTS = {  # name: (speech views, image views)
    "one view": ("one view", "one view"),
    "speeds 0.9, 1.1": ("speeds 0.9, 1.1", "one view"),
    "image moved 2 px": ("one view", "moved 2 px four ways"),
    "speeds 0.9, 1.1 + image moved 2 px (the preset)": ("speeds 0.9, 1.1", "moved 2 px four ways"),
    "speeds 0.9, 0.95, 1.05, 1.1 + image moved 2 px": ("speeds 0.9, 0.95, 1.05, 1.1", "moved 2 px four ways"),
}
SPLITS = ("validation_unseen_voices", "test")


@torch.no_grad()
def embed(model, processor, dataset, rows, key: str) -> torch.Tensor:
    """Embeddings of `dataset`'s `rows`, speech (`key` "input_values") or images ("pixel_values"), through the
    model's own `get_*_features`, so with whatever views its config sets."""
    loader = DataLoader(dataset.select(rows), batch_size=64, collate_fn=SpeechImageCollator(processor))
    if key == "input_values":
        return torch.cat([model.get_speech_features(b["input_values"], b["attention_mask"]) for b in loader])
    return torch.cat([model.get_image_features(b["pixel_values"]) for b in loader])


def scores_of_split(model, processor, dataset) -> dict[str, tuple[float, float]]:
    first = first_row_of_each_image(dataset)
    speech = {}
    for name, speeds in SPEECH.items():
        model.config.test_time_speeds = speeds
        speech[name] = embed(model, processor, dataset, range(len(dataset)), "input_values")
    images = {}
    for name, shift in IMAGE.items():
        model.config.test_time_image_shift = shift
        images[name] = embed(model, processor, dataset, list(first.values()), "pixel_values")
    speech_ids, gallery_ids = torch.tensor([int(i) for i in dataset["image_id"]]), torch.tensor(list(first))
    results = {}
    for variant, (speech_views, image_views) in VARIANTS.items():
        coarse = speech[speech_views] @ images[image_views].t()
        metrics = recall_metrics(ranking(coarse), ranking(coarse.t()), speech_ids, gallery_ids)
        results[variant] = (round(metrics["s2i_R@1"], 1), round(metrics["i2s_R@1"], 1))
    return results


def rescore(models: list[str], scores_of_split, first_column: str, json_path: str | None = None) -> dict:
    """Score every model folder with `scores_of_split(model, processor, dataset) -> {row: (s2i, i2s)}` on the
    held-out-voice validation and test splits; print each model's numbers and the table of their means (sums of both
    directions beside them); write them all to `json_path` if given."""
    datasets = {split: load_demo(split) for split in SPLITS}
    results = {}
    for path in models:
        model, processor = C2FSpeechImageModel.from_pretrained(path).eval(), C2FProcessor.from_pretrained(path)
        by_split = {split: scores_of_split(model, processor, datasets[split]) for split in SPLITS}
        results[path] = {name: {split: by_split[split][name] for split in SPLITS} for name in by_split[SPLITS[0]]}
        print(path, json.dumps(results[path]), flush=True)
    print(f"\nR@1 S->I / I->S (sum), mean of {len(results)} model(s)")
    print(f"| {first_column} | held-out voices (validation) | test |\n|---|---|---|")
    for name in results[models[0]]:
        cells = []
        for split in SPLITS:
            s2i, i2s = (mean(results[path][name][split][d] for path in results) for d in (0, 1))
            cells.append(f"{s2i:.1f} / {i2s:.1f} ({s2i + i2s:.1f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    if json_path:
        with open(json_path, "w") as out:
            json.dump(results, out, indent=1)
    return results


def rescore_from_command_line(description: str, scores_of_split, first_column: str) -> dict:
    """`rescore` the model folders named on the command line (`--json FILE` to keep every number)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="trained c2f folders (the demo's tiny model)")
    parser.add_argument("--json", help="also write every model's numbers here")
    args = parser.parse_args()
    return rescore(args.models, scores_of_split, first_column, args.json)


def main():
    rescore_from_command_line(__doc__, scores_of_split, "views")


if __name__ == "__main__":
    main()
