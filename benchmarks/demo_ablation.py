"""The demo ablation: which parts of c2f buy what, over several seeds, on the shipped demo data.

    python benchmarks/demo_ablation.py [--seeds 3] [--epochs N] [--out outputs/ablation] [--only NAME ...]
    python benchmarks/demo_ablation.py --summarize   # the table again, from the runs already on disk

Each variant is `run_retrieval.py` with its defaults and one switch set, once per seed (seeds 0, 1, ...). Prints
mean ± std over the seeds of S->I and I->S R@1 on the held-out demo test split (unseen voices, unseen colour-shape
pairs), R@1 on the held-out-voice validation split (the split to choose on), and minutes per run. Variants that train
SIM are scored coarse-to-fine (SIC ranking, top k_test re-ranked by SIM), the others by SIC alone. Every run writes
`retrieval_results.json` under OUT/VARIANT/seed-N, which `--summarize` reads back.
"""

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "SIC only (in-batch)": (["--use_queue", "false", "--use_sim", "false", "--use_distillation", "false", "--k_test", "0"], ""),
    "SIC + queue": (["--use_sim", "false", "--use_distillation", "false", "--k_test", "0"], ""),
    "SIC + queue + SIM re-rank": (["--use_distillation", "false"], "reranked_"),
    "full (+ momentum distillation)": ([], "reranked_"),
}
COLUMNS = (("demo test", "s2i_R@1"), ("demo test", "i2s_R@1"),
           ("demo validation_unseen_voices", "s2i_R@1"), ("demo validation_unseen_voices", "i2s_R@1"))


def load_run_retrieval():
    spec = importlib.util.spec_from_file_location("run_retrieval", ROOT / "run_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_retrieval"] = module  # Trainer pickles the arguments dataclass by module name
    spec.loader.exec_module(module)
    return module


def folder_of(out: Path, variant: str, seed: int) -> Path:
    return out / variant.split(" (")[0].replace(" + ", "-").replace(" ", "-") / f"seed-{seed}"


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def summarize(out: Path, seeds: int) -> str:
    lines = ["| variant | seeds | test S→I R@1 | test I→S R@1 | val (held-out voices) S→I R@1 | val I→S R@1 | minutes |",
             "|---|---|---|---|---|---|---|"]
    for variant, (_, prefix) in VARIANTS.items():
        runs = []
        for seed in range(seeds):
            path = folder_of(out, variant, seed) / "retrieval_results.json"
            if path.is_file():
                runs.append(json.loads(path.read_text()))
        if not runs:
            continue
        minutes = mean_std([run["_minutes"] for run in runs if "_minutes" in run])
        # SIM-trained variants: the coarse (SIC) ranking of the same models too, to separate re-ranking from training.
        for row_prefix, label in ((prefix, variant), ("", f"{variant}, coarse only")) if prefix else ((prefix, variant),):
            cells = [mean_std([run[split][row_prefix + metric] for run in runs]) for split, metric in COLUMNS]
            lines.append(f"| {label} | {len(runs)} | {' | '.join(cells)} | {minutes} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=None, help="override run_retrieval's default epochs")
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (by table name)")
    parser.add_argument("--summarize", action="store_true", help="only print the table of the runs on disk")
    args = parser.parse_args()
    if not args.summarize:
        run_retrieval = load_run_retrieval()
        for seed in range(args.seeds):
            for variant, (flags, _) in VARIANTS.items():
                if args.only and variant not in args.only:
                    continue
                folder = folder_of(args.out, variant, seed)
                extra = [] if args.epochs is None else ["--num_train_epochs", str(args.epochs)]
                start = time.perf_counter()
                results = run_retrieval.main(["--output_dir", str(folder), "--seed", str(seed), "--disable_tqdm", "true",
                                              "--report_to", "none", *flags, *extra])
                results["_minutes"] = (time.perf_counter() - start) / 60
                (folder / "retrieval_results.json").write_text(json.dumps(results, indent=2))
                print(f"{variant}, seed {seed}: {results['_minutes']:.1f} min", flush=True)
    print(summarize(args.out, args.seeds))


if __name__ == "__main__":
    main()
