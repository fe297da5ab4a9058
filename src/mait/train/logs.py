"""What a person sees: progress bars on a terminal, one line per epoch, a CSV, TensorBoard scalars and PNG
curves (rank 0 only)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm import tqdm

from .checkpoint import atomic_write_text

CSV_NAME, PLOT_NAME, TB_NAME = "metrics.csv", "curves.png", "tensorboard"


def progress_bar(enabled: bool, iterable: Optional[Iterable] = None, **options: Any) -> tqdm:
    """A tqdm bar when ``enabled`` and its stream (stderr unless ``file=`` says otherwise) is a terminal.

    Written to a file or a pipe, a bar would put every refresh into the log; there the log keeps
    the per-epoch lines alone.
    """
    return tqdm(iterable, disable=None if enabled else True, **options)


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    line = (f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"acc1 {row['val_acc1']:6.2f}  acc5 {row['val_acc5']:6.2f}")
    if "ema_acc1" in row:
        line += f"  ema_acc1 {row['ema_acc1']:6.2f}"
    line += f"  lr {row['lr']:.2e}  {row['epoch_time']:.1f}s"
    return line + (f"  {row['train_images_per_s']:.0f} img/s" if "train_images_per_s" in row else "")


class RunLog:
    """Writes the per-epoch history as CSV (rewritten whole, so a resumed run has no duplicates) and TensorBoard."""

    def __init__(self, folder: Path, enabled: bool, first_epoch: int) -> None:
        self.folder, self.enabled = folder, enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(folder / TB_NAME), purge_step=first_epoch + 1)

    def write(self, history: list[dict[str, Any]]) -> None:
        if not self.enabled or not history:
            return
        buffer = io.StringIO()
        columns = list(dict.fromkeys(key for row in history for key in row))    # stages may log different keys
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.folder / CSV_NAME, buffer.getvalue())
        row = history[-1]
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    """Loss (train, val) and validation accuracy against epochs, as one PNG."""
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [r["val_acc1"] for r in history], label="top-1")
    if "ema_acc1" in history[-1]:
        acc_ax.plot(epochs, [r["ema_acc1"] for r in history], label="top-1 (EMA)")
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="accuracy")
    acc_ax.legend()
    for axis in (loss_ax, acc_ax):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
    return path
