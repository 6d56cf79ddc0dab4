"""Many demo training runs at once, under one deadline, into one JSON file: how the GPU screens were run.

    python benchmarks/demo_screen.py RUNS_FILE --parallel 16 --deadline 520 --out outputs/screen --json screen.json
    python benchmarks/demo_screen.py --summarize screen.json [--seeds 0 1 2]   # mean ± std per variant

RUNS_FILE holds one run a line, in the order they should start: `NAME SEED [run_retrieval.py switches ...]`
(`#` starts a comment). Each run is `run_retrieval.py --output_dir OUT/NAME/seed-SEED --seed SEED` with its switches,
then `benchmarks/demo_errors.py` on the saved model (the test split's arrangement pairs: did this seed learn where
things are?). Runs start as slots free up; a run still going at the deadline is stopped and recorded as such, so a
lent machine's limit never loses the runs that finished. The JSON file is rewritten after every run, with each run's
retrieval results, seconds, the error breakdown and, for a failed run, the end of its log.

Made for a lent GPU shared by many small runs (one CPU thread each, `OMP_NUM_THREADS=1`); the arithmetic there differs
a little from the 2-core CPU runs, so compare runs within one screen.
"""

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from demo_ablation import mean_std

ROOT = Path(__file__).resolve().parent.parent


def read_runs(path: Path) -> list[tuple[str, int, list[str]]]:
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if len(words) < 2 or not words[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected `NAME SEED [switches ...]`, got {line!r}")
        runs.append((words[0], int(words[1]), words[2:]))
    names = [f"{name}/seed-{seed}" for name, seed, _ in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: runs named twice: {repeated}")
    return runs


def run_command(folder: Path, seed: int, switches: list[str]) -> str:
    """One shell line: train, then break down the test split's errors (only when training succeeded)."""
    train = [sys.executable, str(ROOT / "run_retrieval.py"), "--output_dir", str(folder), "--seed", str(seed),
             "--disable_tqdm", "true", "--report_to", "none", *switches]
    errors = [sys.executable, str(ROOT / "benchmarks" / "demo_errors.py"), str(folder), "--split", "test"]
    return (f"{shlex.join(train)} > {folder}/train.log 2>&1 && "
            f"{shlex.join(errors)} > {folder}/errors.md 2> {folder}/errors.log")


def record(folder: Path, seconds: float, status: str, switches: list[str], seed: int) -> dict:
    entry = {"seed": seed, "switches": " ".join(switches), "status": status, "seconds": round(seconds)}
    results = folder / "retrieval_results.json"
    if results.is_file():
        entry["results"] = json.loads(results.read_text())
    if (folder / "errors.md").is_file():
        entry["errors"] = (folder / "errors.md").read_text()
    if status != "ok" and (folder / "train.log").is_file():
        entry["log_tail"] = (folder / "train.log").read_text()[-3000:]
    return entry


# demo_errors.py's row for arrangement pairs: "| arrangement | errors (share) | pairs | SIC % | SIM % |"
ARRANGEMENT_ROW = re.compile(r"^\| arrangement \| \d+ \(\d+%\) \| \d+ \| (\d+)% \| (\d+)% \|$", re.MULTILINE)


def run_row(entry: dict) -> dict[str, float]:
    """The numbers a screen is read by: test R@1 coarse and re-ranked, the held-out-voice split (what choices are made
    on) summed over both directions, coarse and re-ranked, and how often SIC and SIM put the right image above its
    arrangement twin."""
    test, held_out = entry["results"]["demo test"], entry["results"]["demo validation_unseen_voices"]
    row = {"test S→I": test["s2i_R@1"], "test I→S": test["i2s_R@1"],
           "re-ranked S→I": test.get("reranked_s2i_R@1", math.nan), "re-ranked I→S": test.get("reranked_i2s_R@1", math.nan),
           "held-out sum": held_out["s2i_R@1"] + held_out["i2s_R@1"],
           "held-out re-ranked sum": held_out.get("reranked_s2i_R@1", math.nan) + held_out.get("reranked_i2s_R@1", math.nan)}
    found = ARRANGEMENT_ROW.search(entry.get("errors", ""))
    row["twins SIC %"], row["twins SIM %"] = (float(found[1]), float(found[2])) if found else (math.nan, math.nan)
    return row


def summarize(path: Path, seeds: list[int] | None) -> str:
    """A markdown table: per variant, mean ± std over its finished runs (only `seeds`, when given)."""
    variants: dict[str, list[dict]] = {}
    for key, entry in json.loads(path.read_text())["runs"].items():
        if entry["status"] == "ok" and (seeds is None or entry["seed"] in seeds):
            variants.setdefault(key.rsplit("/seed-", 1)[0], []).append(run_row(entry))
    columns = list(next(iter(variants.values()))[0]) if variants else []
    lines = [f"| variant | runs | {' | '.join(columns)} |", "|---" * (len(columns) + 2) + "|"]
    for name, rows in variants.items():
        cells = [mean_std([row[column] for row in rows if not math.isnan(row[column])]) for column in columns]
        lines.append(f"| {name} | {len(rows)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?")
    parser.add_argument("--summarize", type=Path, default=None, help="print the table of a screen's JSON file and stop")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="with --summarize: only these seeds")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--deadline", type=float, help="seconds from now; runs still going are stopped")
    parser.add_argument("--out", type=Path, default=Path("outputs/screen"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize, args.seeds))
        return
    if args.runs is None or args.deadline is None or args.json is None:
        parser.error("a screen needs RUNS_FILE, --deadline and --json (or --summarize FILE)")
    runs = read_runs(args.runs)
    end = time.monotonic() + args.deadline
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    waiting, going, done, skipped = list(runs), {}, {}, []

    def write():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": done, "not_started": skipped}, indent=1))

    while waiting or going:
        while waiting and len(going) < args.parallel and time.monotonic() < end:
            name, seed, switches = waiting.pop(0)
            folder = args.out / name / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            process = subprocess.Popen(run_command(folder, seed, switches), shell=True, env=environment,
                                       cwd=ROOT, start_new_session=True)
            going[f"{name}/seed-{seed}"] = (process, time.monotonic(), folder, switches, seed)
        time.sleep(2)
        for key, (process, started, folder, switches, seed) in list(going.items()):
            overdue = time.monotonic() >= end
            if process.poll() is None and not overdue:
                continue
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
                status = "stopped at the deadline"
            else:
                status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
            done[key] = record(folder, time.monotonic() - started, status, switches, seed)
            del going[key]
            print(f"{key}: {status}, {done[key]['seconds']} s", flush=True)
            write()
        if time.monotonic() >= end:
            skipped += [f"{name}/seed-{seed}" for name, seed, _ in waiting]
            waiting.clear()
    write()


if __name__ == "__main__":
    main()
