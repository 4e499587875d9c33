"""A job's training curve as a picture (matplotlib) or TensorBoard event files."""
from __future__ import annotations

import math
import pathlib

from psgrid.spec import HistoryRow


def plot_history(rows: list[HistoryRow], path: str | pathlib.Path, title: str = "",
                 width_px: int = 1200, height_px: int = 500, dpi: int = 100) -> pathlib.Path:
    """Loss against steps (left) and every evaluation metric against steps (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    losses = [(r.step, r.loss) for r in rows if not math.isnan(r.loss)]
    if losses:
        loss_ax.plot(*zip(*losses), color="tab:blue")
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss")
    loss_ax.grid(alpha=0.3)
    names = sorted({name for r in rows for name in r.metrics})
    for name in names:
        points = [(r.step, r.metrics[name]) for r in rows if name in r.metrics]
        metric_ax.plot(*zip(*points), marker="o", label=name)
    metric_ax.set(xlabel="step", title="evaluation")
    if names:
        metric_ax.legend()
    metric_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, format="png", dpi=dpi)
    plt.close(fig)
    return path


def write_tensorboard(rows: list[HistoryRow], logdir: str | pathlib.Path, run: str = "") -> int:
    """Write ``train/loss``, ``train/samples_per_sec`` and ``eval/<metric>`` scalars by step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(pathlib.Path(logdir) / run) if run else str(logdir))
    try:
        for r in rows:
            if not math.isnan(r.loss):
                writer.add_scalar("train/loss", r.loss, r.step, walltime=r.time_unix)
            if r.samples_per_sec:
                writer.add_scalar("train/samples_per_sec", r.samples_per_sec, r.step, walltime=r.time_unix)
            for name, value in r.metrics.items():
                writer.add_scalar(f"eval/{name}", value, r.step, walltime=r.time_unix)
    finally:
        writer.close()
    return len(rows)
