"""Run a train-mode forward twice without counting the batch twice in BatchNorm statistics."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged inside the block.

    Normalisation still uses batch statistics (train mode), so outputs are unchanged; only the
    running-average update is suppressed. Used for recomputation (activation checkpointing)
    and for the lookahead bank's extra forward, which would otherwise update the statistics
    twice per step.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
