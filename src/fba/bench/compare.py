"""``fba compare``: several methods trained with one budget, one row per method (paper Table 1).

Every method gets the same config (dataset, model, K, epochs, batch, seed, optimiser); only
``method`` changes. Each row holds the method's accuracy (top-1, or PSNR for
super-resolution), seconds per epoch, peak training memory (the CPU live-tensor tracker on
the first step, or the CUDA allocator peak), and the memory and time ratios to ``bp``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fba.bench.report import MiB, save_figure, write_tables
from fba.tasks import get_task

COLUMNS = ["method", "K", "metric", "seconds_per_epoch", "peak_memory_bytes", "memory_ratio_to_bp", "time_ratio_to_bp"]


def compare_methods(base: str | Mapping[str, Any] | None, methods: Sequence[str], overrides: Sequence[str] = (),
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train each method on ``base`` + ``overrides`` and return one row per method.

    Rows carry the trainer's summary plus ``metric`` (the task plugin's primary metric,
    e.g. ``top1`` or ``psnr``, named by ``metric_name``), ``memory_ratio_to_bp`` and
    ``time_ratio_to_bp`` (None without a ``bp`` row).
    """
    from fba.bench.variants import train_variants

    runs = train_variants(base, {m: [f"method={m}"] for m in methods}, list(overrides), log=log)
    rows = []
    for run in runs:
        metric_name = get_task(run["task"]).primary_metric
        rows.append({"method": run["variant"], "K": run["K"], "metric_name": metric_name, "metric": run.get(metric_name),
                     **{k: v for k, v in run.items() if k not in ("variant", "overrides")}})
    bp = next((r for r in rows if r["method"] == "bp"), None)
    for row in rows:
        for key, ratio in (("peak_memory_bytes", "memory_ratio_to_bp"), ("seconds_per_epoch", "time_ratio_to_bp")):
            row[ratio] = row[key] / bp[key] if bp and bp.get(key) and row.get(key) is not None else None
    return rows


def metric_table(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and columns for printing, with the metric column named after the metric (``top1``, ``psnr``)."""
    metric = rows[0]["metric_name"] if rows else "top1"
    return [{**r, metric: r["metric"]} for r in rows], [c if c != "metric" else metric for c in COLUMNS]


def write_report(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """``compare.csv``, ``compare.md``, ``compare.json`` and ``compare.png`` in ``out_dir``."""
    import json

    files = write_tables(*metric_table(rows), out_dir, "compare")
    (out_dir / "compare.json").write_text(json.dumps(list(rows), indent=1, default=str))
    return files + [out_dir / "compare.json", accuracy_chart(rows, out_dir / "compare.png", title)]


def accuracy_chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Two scatter plots: accuracy against peak memory, and against seconds per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = get_task(rows[0]["task"]).metric_label if rows else ""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, xlabel in ((axes[0], "peak_memory_bytes", "peak training memory (MiB)"),
                            (axes[1], "seconds_per_epoch", "seconds per epoch")):
        for row in rows:
            if row.get(key) is None or row.get("metric") is None:
                continue
            x = row[key] / MiB if key == "peak_memory_bytes" else row[key]
            ax.scatter(x, row["metric"], s=40, color="tab:red" if row["method"] == "fba" else "tab:blue")
            ax.annotate(row["method"], (x, row["metric"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
