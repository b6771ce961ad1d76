"""BP with activation checkpointing per unit: the memory baseline a user would otherwise pick.

Only each unit's input is kept during the forward; a unit's activations are recomputed
during the backward. Gradients equal plain BP's; BatchNorm running statistics are updated
once per step (the recomputation does not count the batch again). ``checkpoint=true`` gives
any local method the same per-unit checkpointing inside each of its modules.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from fba.engine.checkpointing import CheckpointedUnits
from fba.methods import METHODS
from fba.methods.base import LocalMethod


@METHODS.register("bp_checkpoint")
class BackPropCheckpoint(LocalMethod):
    name = "bp_checkpoint"
    end_to_end = True
    checkpoints_activations = True

    def module_from_units(self, units: Sequence[nn.Module]) -> nn.Module:
        return CheckpointedUnits(*units)
