"""BP with activation checkpointing per unit: the memory baseline a user would otherwise pick.

Only each unit's input is kept during the forward; a unit's activations are recomputed
during the backward. Gradients equal plain BP's; BatchNorm running statistics are updated
once per step (the recomputation does not count the batch again).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fba.engine.bn import frozen_bn_statistics
from fba.methods import METHODS
from fba.methods.base import LocalMethod


class CheckpointedUnits(nn.Sequential):
    """``nn.Sequential`` that checkpoints each unit when training with gradients."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        for unit in self:
            if self.training and torch.is_grad_enabled():
                x = checkpoint(unit, x, use_reentrant=False, context_fn=_bn_safe_contexts(unit))
            else:
                x = unit(x)
        return x


def _bn_safe_contexts(unit: nn.Module):
    # (forward context, recomputation context)
    return lambda: (contextlib.nullcontext(), frozen_bn_statistics(unit))


@METHODS.register("bp_checkpoint")
class BackPropCheckpoint(LocalMethod):
    name = "bp_checkpoint"
    end_to_end = True

    def module_from_units(self, units: Sequence[nn.Module]) -> nn.Module:
        return CheckpointedUnits(*units)
