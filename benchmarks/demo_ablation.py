"""The demo ablation: which parts of c2f buy what, trained and tested on the shipped demo data in one run.

    python benchmarks/demo_ablation.py [--epochs N] [--out outputs/ablation]

Prints one table: S->I and I->S R@1/5/10 on the held-out demo test split (unseen voices, unseen colour-shape pairs)
and training minutes, for SIC only (in-batch), SIC + queue, SIC + queue + SIM re-rank, and full (+ momentum
distillation). Every variant uses the same run_retrieval defaults, seed and data.
"""

import argparse
import importlib.util
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


def load_run_retrieval():
    spec = importlib.util.spec_from_file_location("run_retrieval", ROOT / "run_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_retrieval"] = module
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=None, help="override run_retrieval's default epochs")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (by table name)")
    args = parser.parse_args()
    run_retrieval = load_run_retrieval()
    rows = []
    for name, (flags, prefix) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        extra = [] if args.epochs is None else ["--num_train_epochs", str(args.epochs)]
        folder = Path(args.out) / name.split(" (")[0].replace(" + ", "-").replace(" ", "-")
        start = time.perf_counter()
        results = run_retrieval.main(["--output_dir", str(folder), "--disable_tqdm", "true", *flags, *extra])
        minutes = (time.perf_counter() - start) / 60
        metrics = results["demo test"]
        cells = run_retrieval.recall_cells(metrics, prefix)
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {minutes:.1f} |")
        print(rows[-1], flush=True)
    print("\n| variant | S→I R@1/5/10 | I→S R@1/5/10 | train + eval minutes |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
