"""A short probe of an initialisation: the default demo run, stopped after a few epochs, with parts of its initial
weights taken from another seed's draw or set to zero.

    python benchmarks/demo_init_probe.py --seed 42 [--swap vision_model.=0 ...] [--zero match_head. ...]
                                         [--epochs 6.5] [-- more run_retrieval.py arguments]

Why: a run that fits its training pairs late shows it early. Seed 42's default runs stood at a SIC loss of 1.5-1.7 at
epoch 5, against 1.05-1.1 for seeds 0-2, and ended about 6 points lower on test. Two or three minutes tell a slow start
from a normal one, where a whole run takes nine. The learning-rate schedule stays the whole run's (22 epochs); only the
run is cut short. Prints the SIC loss averaged over the logged steps within 0.7 epochs of epochs 3 to 6, and the first
logged SIM loss (steps 1-20).

`--swap PREFIX=SEED`: after the model is built from `--seed`, its tensors whose names start with PREFIX are replaced by
those of a model built from SEED. Every other tensor keeps the `--seed` draw, and the data draws stay those of `--seed`.
"""

import argparse
import random
import sys
import tempfile

import numpy as np
import torch
from transformers import TrainerCallback, set_seed

import c2f.train as program


class Probe(TrainerCallback):
    """Keeps the logged losses and stops training after `epochs` epochs."""

    def __init__(self, epochs: float):
        self.epochs = epochs
        self.logged: list[tuple[float, float, float]] = []  # (epoch, SIC loss, SIM loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss_sic" in logs:
            self.logged.append((float(state.epoch), float(logs["loss_sic"]), float(logs.get("loss_sim", "nan"))))

    def on_step_end(self, args, state, control, **kwargs):
        if state.epoch >= self.epochs:
            control.should_training_stop = True

    def sic_loss_near(self, epoch: float) -> float:
        near = [sic for at, sic, _ in self.logged if abs(at - epoch) < 0.7]
        return sum(near) / len(near) if near else float("nan")


def names_under(weights: dict, prefix: str, option: str) -> list[str]:
    """The weight names that start with `prefix`; an error naming the `option` when there are none."""
    names = [name for name in weights if name.startswith(prefix)]
    if not names:
        raise ValueError(f"{option}: no weights start with {prefix!r}")
    return names


def with_other_draws(build, swaps: list[tuple[str, int]], zeros: list[str]):
    """`build_model_and_processor`, with the named parts of the model replaced by other seeds' draws or zeros."""

    def build_probed(model_args):
        model, processor = build(model_args)
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        weights = model.state_dict()
        with torch.no_grad():
            for prefix, seed in swaps:
                set_seed(seed)
                donor = build(model_args)[0].state_dict()
                for name in names_under(weights, prefix, f"--swap {prefix}={seed}"):
                    weights[name].copy_(donor[name])
            for prefix in zeros:
                for name in names_under(weights, prefix, f"--zero {prefix}"):
                    weights[name].zero_()
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        return model, processor

    return build_probed


def swap(text: str) -> tuple[str, int]:
    prefix, _, seed = text.rpartition("=")
    if not prefix or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"--swap takes PREFIX=SEED (e.g. vision_model.=0), got {text!r}")
    return prefix, int(seed)


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # after "--": run_retrieval.py's own arguments
    own, rest = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--swap", type=swap, nargs="*", default=[], help="PREFIX=SEED: these weights from SEED's draw")
    parser.add_argument("--zero", nargs="*", default=[], help="PREFIX: these weights set to zero")
    parser.add_argument("--epochs", type=float, default=6.5, help="stop after this many epochs")
    args = parser.parse_args(own)

    probe = Probe(args.epochs)

    class ProbedTrainer(program.C2FTrainer):
        def __init__(self, *positional, **named):
            super().__init__(*positional, **named)
            self.add_callback(probe)

    program.C2FTrainer = ProbedTrainer
    program.build_model_and_processor = with_other_draws(program.build_model_and_processor, args.swap, args.zero)
    with tempfile.TemporaryDirectory() as folder:
        program.main(["--seed", str(args.seed), "--output_dir", folder, "--disable_tqdm", "true", "--report_to", "none",
                      *rest])
    changed = [f"{prefix} from seed {seed}" for prefix, seed in args.swap] + [f"{prefix} zero" for prefix in args.zero]
    losses = " / ".join(f"{probe.sic_loss_near(epoch):.2f}" for epoch in (3, 4, 5, 6))
    print(f"seed {args.seed}{', ' if changed else ''}{', '.join(changed)}: SIC loss at epochs 3 / 4 / 5 / 6: {losses}; "
          f"first SIM loss {probe.logged[0][2]:.3f}")


if __name__ == "__main__":
    main()
