"""The training curves: ``training_curves.png`` in the output folder at the end of training.

``plot_training_curves`` draws every loss term over steps (training, and evaluation as dashed lines) and
the eval ACC/AUC of each head from ``Trainer.state.log_history``; ``CurvesCallback`` calls it.
"""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback

CURVES_NAME = "training_curves.png"


def plot_training_curves(log_history: list[dict], path: str) -> str | None:
    """A PNG of the training curves: every loss term over steps (training, and evaluation as dashed
    lines), and the eval ACC/AUC of each head. Returns ``path``, or None when there is nothing to draw."""
    import matplotlib  # here, not at import: the backend is chosen before pyplot loads, only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = {}, {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if key == "loss" or key.startswith("loss_"):
                train.setdefault(key, []).append((step, value))
            elif key == "eval_loss" or key.startswith("eval_loss_") or key.startswith(("eval_acc_", "eval_auc_")):
                evals.setdefault(key, []).append((step, value))
    if not train and not evals:
        return None
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {}
    for key, points in sorted(train.items()):
        line, = ax_loss.plot(*zip(*points), label=f"train {key}", lw=1.4)
        colors[key] = line.get_color()
    for key, points in sorted(evals.items()):
        if key.startswith("eval_loss"):
            base = key[len("eval_"):]
            ax_loss.plot(*zip(*points), ls="--", marker="o", ms=3, color=colors.get(base), label=f"eval {base}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (terms unweighted)")
    if any(v > 0 for pts in train.values() for _, v in pts):
        ax_loss.set_yscale("log")
    ax_loss.set_title("losses")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_loss.grid(alpha=0.3)
    names = {"t": "two-tower", "s": "single-tower"}
    drawn = False
    for key, points in sorted(evals.items()):
        if key.startswith(("eval_acc_", "eval_auc_")):
            metric, head = key[len("eval_"):].split("_", 1)
            ax_metric.plot(*zip(*points), marker="o", ms=3, ls="-" if metric == "acc" else "--",
                           label=f"{metric.upper()} {names.get(head, head)}")
            drawn = True
    ax_metric.set_xlabel("step")
    ax_metric.set_title("evaluation")
    ax_metric.set_ylim(0, 1.02)
    ax_metric.grid(alpha=0.3)
    if drawn:
        ax_metric.legend(fontsize=8)
    else:
        ax_metric.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ax_metric.transAxes)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class CurvesCallback(TrainerCallback):
    """Writes ``training_curves.png`` into the output folder at the end of training (main process)."""

    def __init__(self, filename: str = CURVES_NAME):
        self.filename = filename

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            plot_training_curves(state.log_history, os.path.join(args.output_dir, self.filename))


__all__ = ["CURVES_NAME", "CurvesCallback", "plot_training_curves"]
