"""Benchmark tables (text, CSV, Markdown) and charts (PNG)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

MiB = 2**20


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes") or key in ("params", "grads", "optimizer", "bank", "activations"):
        return f"{value / MiB:.1f}"
    if "ratio" in key:
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _header(key: str) -> str:
    if key.endswith("_bytes") or key in ("params", "grads", "optimizer", "bank", "activations"):
        return f"{key.replace('_bytes', '')} (MiB)"
    return key


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_header(c) for c in columns]] + [[_fmt(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(_header(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_tables(rows: Sequence[dict[str, Any]], columns: Sequence[str], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, columns) + "\n")
    return [csv_path, md_path]


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def memory_chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Stacked bars of the peak-memory breakdown, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["params", "grads", "optimizer", "bank", "activations"]
    labels = [r["method"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(rows), 4))
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [(r.get(part) or 0) / MiB for r in rows]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        ratio = r.get("memory_ratio_to_bp")
        note = f"{r['peak_bytes'] / MiB:.0f} MiB" + (f"\n{ratio:.2f}x BP" if ratio is not None else "")
        ax.text(i, bottom[i], note, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("peak training memory (MiB)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(bottom) * 1.25 if bottom and max(bottom) > 0 else 1)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def time_chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(rows), 4))
    ax.bar([r["method"] for r in rows], [r["seconds_per_step"] * 1000 for r in rows], color="tab:orange")
    ax.set_ylabel("median ms per training step")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
