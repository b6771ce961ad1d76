"""Per-epoch metrics as CSV and JSON, TensorBoard scalars, and a PNG of the curves."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fba.training.checkpoint import atomic_write


class RunRecords:
    """``enabled=False`` (replicas other than the main process) keeps rows but writes nothing."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]] | None = None, tensorboard: bool = True,
                 enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.enabled = enabled
        self._writer = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalar(self, name: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(name, value, step)

    def add_epoch(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.scalar(f"epoch/{key}", value, row["epoch"])
        self.save()

    def save(self) -> None:
        if not self.enabled:
            return
        atomic_write(self.run_dir / "metrics.json", lambda p: Path(p).write_text(json.dumps(self.rows, indent=1)))
        fields = list(dict.fromkeys(k for row in self.rows for k in row))

        def write_csv(p: str) -> None:
            with open(p, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.run_dir / "metrics.csv", write_csv)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax_loss.plot(epochs, [r.get("train_loss") for r in self.rows], marker="o", label="train (last module)")
        ax_loss.plot(epochs, [r.get("test_loss") for r in self.rows], marker="o", label="test")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_loss.legend()
        if any("psnr" in r for r in self.rows):  # super-resolution: PSNR beside the bicubic baseline
            ax_acc.plot(epochs, [r.get("psnr") for r in self.rows], marker="o", color="tab:green", label="model")
            ax_acc.plot(epochs, [r.get("psnr_bicubic") for r in self.rows], ls="--", color="tab:gray", label="bicubic")
            ax_acc.set(xlabel="epoch", ylabel="PSNR (dB)", title="validation PSNR")
            ax_acc.legend()
        else:
            ax_acc.plot(epochs, [r.get("top1") for r in self.rows], marker="o", color="tab:green")
            ax_acc.set(xlabel="epoch", ylabel="top-1", title="test top-1", ylim=(0, 1))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(self.run_dir / "curves.png", lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
