"""Train several config variants with one budget and collect one row per variant."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

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
