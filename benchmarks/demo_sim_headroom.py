"""Is the SIM head what holds re-ranking back? Train only the SIM head of a trained demo model for more epochs and
compare its re-ranking before and after.

    python benchmarks/demo_sim_headroom.py outputs/c2f-demo [--epochs 4] [--multimodal_layers 2]

Everything but the multimodal encoder and the match head is frozen, so the coarse (SIC) ranking stays as it was and
only the fine one can move. With `--multimodal_layers 2` the head gets a second, freshly initialised layer. Hard
negatives are mined from the frozen SIC similarities in the demo's neighbour batches, as in training; the queue and
distillation are off (they only shape SIC). Prints R@1 both ways, coarse and re-ranked, on the demo's test split and
its held-out-voice validation split, before and after.
"""

import argparse
import json
import tempfile
from pathlib import Path

from transformers import AutoProcessor

import c2f.train as train
from c2f.modeling_c2f import C2FSpeechImageModel

SPLITS = {"demo test": "test", "demo validation_unseen_voices": "held-out voices"}


def r1(metrics: dict, prefix: str) -> str:
    return f"{metrics[f'{prefix}s2i_R@1']:.1f} / {metrics[f'{prefix}i2s_R@1']:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a trained c2f folder with its retrieval_results.json")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--multimodal_layers", type=int, default=None, help="default: the model's own")
    args = parser.parse_args()
    before = json.loads((Path(args.model) / "retrieval_results.json").read_text())

    def sim_only(model_args):
        overrides = {} if args.multimodal_layers is None else {"multimodal_num_layers": args.multimodal_layers}
        model = C2FSpeechImageModel.from_pretrained(args.model, **overrides)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(("multimodal_encoder.", "match_head."))
        return model, AutoProcessor.from_pretrained(args.model, trust_remote_code=True)

    train.build_model_and_processor = sim_only
    with tempfile.TemporaryDirectory() as output:
        after = train.main(["--model_name_or_path", args.model, "--output_dir", output, "--num_train_epochs", str(args.epochs),
                            "--use_queue", "false", "--use_distillation", "false", "--momentum_start_epochs", "1000",
                            "--report_splits", "validation_unseen_voices", "--eval_strategy", "no"])
    print("\n| split | coarse, before | re-ranked, before | coarse, after | re-ranked, after |\n|---|---|---|---|---|")
    for key, label in SPLITS.items():
        print(f"| {label} | {r1(before[key], '')} | {r1(before[key], 'reranked_')} | {r1(after[key], '')} | "
              f"{r1(after[key], 'reranked_')} |")


if __name__ == "__main__":
    main()
