"""Activation checkpointing of a module's units (for bp_checkpoint and ``checkpoint=true``).

Only each unit's input is kept during the forward; the unit's inner activations are
recomputed during the backward. Gradients are those of the plain forward, and BatchNorm
running statistics are updated once per step: the recomputation does not count the batch
again.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fba.engine.bn import frozen_bn_statistics


class CheckpointedUnits(nn.Sequential):
    """``nn.Sequential`` of units that checkpoints each unit when training with gradients.

    ``(N, C_in, H, W) -> (N, C_out, H', W')``, the same as the plain chain of units.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        for unit in self:
            x = run_checkpointed(unit, x) if self.training and torch.is_grad_enabled() else unit(x)
        return x


class BatchChunkable(nn.Module):
    """A module that can run a training forward and backward in ``checkpoint_chunks`` batch
    chunks, holding one chunk's maps at a time (0: off). :func:`checkpoint_batch_chunks`
    turns it on inside checkpointed local modules; an exported model has it off."""

    checkpoint_chunks: int = 0


class PerSampleModule(BatchChunkable):
    """A module whose output for each sample depends on that sample alone (no BatchNorm).

    Such a module can be checkpointed in batch chunks: with ``checkpoint_chunks = n`` a
    training forward runs it on n slices of the batch, each under activation checkpointing,
    so that the backward recomputes one slice at a time. It pays where the module's inner
    maps are much larger than its input and output, as in an SR reconstruction tail, whose
    upsampler writes maps at the HR resolution. Parameter names and outputs are unchanged.
    """

    def __call__(self, x: Tensor) -> Any:
        if self.checkpoint_chunks and self.training and torch.is_grad_enabled():
            call = super().__call__
            return torch.cat([checkpoint(call, part, use_reentrant=False) for part in x.chunk(self.checkpoint_chunks)])
        return super().__call__(x)


def checkpoint_batch_chunks(module: nn.Module, chunks: int) -> int:
    """Turn on ``chunks`` batch chunks (the config's ``checkpoint_chunks``) in every
    :class:`BatchChunkable` inside ``module`` (per-sample modules, and the conv-BatchNorm stems
    of ``fba.engine.chunked_bn``).

    Returns how many it set.
    """
    found = [sub for sub in module.modules() if isinstance(sub, BatchChunkable)]
    for sub in found:
        sub.checkpoint_chunks = chunks
    return len(found)


# The recomputation runs on the thread of the backward that needs it (an autograd thread on
# CUDA), and so do the side channels it reaches: one count per thread.
_recomputing = threading.local()


def is_recomputing() -> bool:
    """Whether a :func:`run_checkpointed` unit is being recomputed in a backward on this thread.

    Side channels that a forward writes for a later module to read (detection's pyramid taps)
    skip the recomputation: it would overwrite or clear what the first forward left there.
    """
    return getattr(_recomputing, "depth", 0) > 0


@contextlib.contextmanager
def _recomputation(module: nn.Module):
    _recomputing.depth = getattr(_recomputing, "depth", 0) + 1
    try:
        with frozen_bn_statistics(module):
            yield
    finally:
        _recomputing.depth -= 1


def run_checkpointed(module: nn.Module, x: Tensor) -> Any:
    """``module(x)`` keeping only ``x`` for the backward; BatchNorm counts the batch once."""
    # (forward context, recomputation context): the recomputation must not update BatchNorm.
    contexts = lambda: (contextlib.nullcontext(), _recomputation(module))  # noqa: E731
    return checkpoint(module, x, use_reentrant=False, context_fn=contexts)
