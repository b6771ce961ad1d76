"""Train several config variants with one budget and collect one row per variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from fba.config import resolve_config


def train_variants(base: str | Mapping[str, Any] | None, variants: Mapping[str, list[str]],
                   common: list[str] | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train each variant (``name -> key=value overrides``) on top of ``base`` + ``common``.

    Every variant shares the base config's epochs, batch size, seed and data, so the rows
    differ only by the overrides. Returns the trainers' summaries plus the variant name,
    its overrides and the wall time.
    """
    from fba.training.trainer import Trainer

    rows = []
    for name, overrides in variants.items():
        cfg = resolve_config(base, [*(common or []), *overrides])
        start = time.perf_counter()
        trainer = Trainer(cfg, log=lambda msg: None)
        log(f"[{name}] training {trainer.cfg['method']} {trainer.cfg['model']} K={trainer.learner.K} ...")
        summary = trainer.fit()
        row = {"variant": name, "overrides": " ".join(overrides), **summary,
               "wall_seconds": time.perf_counter() - start}
        if trainer.learner.bank is not None:
            row["bank_bytes"] = trainer.learner.bank.nbytes()
        from fba.training.trainer import describe_metrics

        log(f"[{name}] {describe_metrics(row)}, {row['seconds_per_epoch']:.1f} s/epoch")
        rows.append(row)
    return rows


def train_in_subprocess(overrides: list[str], log: Path) -> tuple[int, dict[str, Any] | None]:
    """``fba train --json`` with ``overrides`` in a child process on one thread.

    Several such runs side by side share the cores without oversubscribing them. The child's
    output (stdout and stderr) goes to ``log``. Returns its exit code and its JSON summary
    (None when it failed).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as file:
        code = subprocess.call([sys.executable, "-m", "fba", "train", *overrides, "--json"],
                               stdout=file, stderr=subprocess.STDOUT, env=env)
    lines = log.read_text().strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 and lines else None)


def runs_by_variant(runs: Iterable[dict[str, Any]], names: Iterable[str]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(name, its runs sorted by seed)`` for each name in ``names`` that has runs, in that order."""
    runs = list(runs)
    for name in names:
        mine = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])
        if mine:
            yield name, mine
