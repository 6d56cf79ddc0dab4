"""One picture of a finished run: the loss parts, temperature, alpha and queue fill over the steps, and the R@k it
reached. Written next to the model as `training_curves.png`, from `trainer.state.log_history` (what
`trainer_state.json` holds)."""

import os
from pathlib import Path

PANELS = (
    ("losses", ("loss", "loss_sic", "loss_sim")),
    ("temperature", ("temperature",)),
    ("distillation alpha", ("alpha",)),
    ("queue fill", ("queue_fill",)),
)


def plot_training_curves(log_history: list[dict], results: dict[str, dict[str, float]], path: str | os.PathLike) -> Path:
    """Draws the training logs and the evaluation table into one PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    logs = [entry for entry in log_history if "step" in entry and "loss" in entry]
    figure, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4 * (len(PANELS) + 1), 3.4))
    steps = [entry["step"] for entry in logs]
    for axis, (title, keys) in zip(axes, PANELS):
        for key in keys:
            values = [float(entry[key]) if key in entry else float("nan") for entry in logs]
            axis.plot(steps, values, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        if not logs:  # a run shorter than --logging_steps: still a picture, saying why it is empty
            axis.text(0.5, 0.5, "no loss logged\n(run shorter than\n--logging_steps)", ha="center", va="center",
                      transform=axis.transAxes, fontsize=8)
        if len(keys) > 1:
            axis.legend(fontsize=8)
    table = axes[-1]
    table.axis("off")
    table.set_title("R@1 / R@5 / R@10")
    lines = []
    for name, metrics in results.items():
        for label, prefix in (("coarse", ""), ("re-ranked", "reranked_")):
            if f"{prefix}s2i_R@1" in metrics:
                cells = [" / ".join(f"{metrics[f'{prefix}{d}_R@{k}']:.1f}" for k in (1, 5, 10)) for d in ("s2i", "i2s")]
                lines.append(f"{name}, {label}\n  S→I {cells[0]}\n  I→S {cells[1]}")
    table.text(0, 1, "\n".join(lines) or "(no evaluation)", va="top", family="monospace", fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

