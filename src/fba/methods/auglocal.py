"""AugLocal: auxiliary networks built from the backbone's own later layers (Ma et al. 2024).

The auxiliary network of module k is a small copy of "the rest of the network": ``d_k``
units sampled uniformly from the units after module k, each rebuilt as a *fresh* block with
that unit's architecture (random initialisation, no weight sharing), then global average
pooling, BatchNorm1d (only when ``d_k <= 1``) and a linear classifier. Cross-entropy loss,
one optimizer step per training step (``default_step = "global"``).

Sampling (``l`` = index of module k's last unit, ``L`` = number of units, ``d = d_k``)::

    indices = round(l + (L - l - 1) / d * i)   for i = 1..d

Pyramidal depth (deeper modules get shallower aux nets)::

    d_k = max(1, round(depth * (1 - k*tau/(K-2)) + k*tau/(K-2)))

``round`` is Python's (halves go to the even integer), as the formulas are written.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from fba.methods import METHODS
from fba.methods.base import BuildContext, LocalMethod
from fba.methods.dgl import classifier_num_classes


def pyramidal_depth(k: int, K: int, depth: int, tau: float) -> int:
    """Aux depth ``d_k`` of module k out of K. With K <= 2 only module 0 has an aux net: ``depth``."""
    ratio = k * tau / (K - 2) if K > 2 else 0.0
    return max(1, round(depth * (1 - ratio) + ratio))


def sampled_unit_indices(last_unit: int, num_units: int, depth: int) -> list[int]:
    """Units whose architectures make up the aux net of a module ending at ``last_unit``.

    ``round(l + (L - l - 1) / d * i)`` for ``i = 1..d``; the last index is always ``L - 1``.
    Each index is kept after the module (``>= l + 1``): when fewer than ``d`` units follow
    it, rounding could otherwise land on the module's own unit; a unit's architecture then
    repeats, as fresh blocks.
    """
    after = num_units - last_unit - 1
    if after < 1:
        raise ValueError(f"unit {last_unit} is the last of {num_units}: no units follow it to sample from")
    return [min(num_units - 1, max(last_unit + 1, round(last_unit + after / depth * i))) for i in range(1, depth + 1)]


class AugLocalAux(nn.Module):
    """Sampled blocks, GAP, optional BatchNorm1d, linear classifier: ``(N, C, H, W) -> (N, classes)``.

    Attributes:
        unit_indices: the backbone units whose architectures the blocks copy (for inspection).
    """

    def __init__(self, blocks: list[nn.Module], channels: int, num_classes: int, unit_indices: list[int]) -> None:
        super().__init__()
        self.unit_indices = list(unit_indices)
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm1d(channels) if len(blocks) <= 1 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        pooled = self.blocks(h).mean(dim=(2, 3))
        return self.fc(self.norm(pooled))


@METHODS.register("auglocal")
class AugLocal(LocalMethod):
    """AugLocal auxiliary networks.

    Args:
        depth: ``d``, the aux depth (sampled blocks) of module 0.
        tau: pyramidal decay; module K-2's depth is about ``d * (1 - tau) + tau``.

    K is the number of modules the user asked for. (The reference trains K - d modules when
    asked for K; this class does not reduce K.)
    """

    name = "auglocal"
    default_step = "global"

    def __init__(self, depth: int = 2, tau: float = 0.5) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"auglocal.depth must be an integer >= 1, got {depth!r}")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"auglocal.tau must be in [0, 1], got {tau}")
        self.depth = depth
        self.tau = tau

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "AugLocal":
        return cls(depth=config["auglocal"]["depth"], tau=config["auglocal"]["tau"])

    def aux_plan(self, ctx: BuildContext) -> list[list[int]]:
        """Sampled unit indices of each module's aux net (K-1 lists; the depth is each length)."""
        num_units = len(ctx.model.specs)
        return [sampled_unit_indices(ctx.groups[k][-1], num_units, pyramidal_depth(k, ctx.K, self.depth, self.tau))
                for k in range(ctx.K - 1)]

    def build_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        if ctx.K == 1:
            return []
        num_classes = classifier_num_classes(ctx.model, self.name)
        specs = ctx.model.specs
        nets = []
        for k, indices in enumerate(self.aux_plan(ctx)):
            channels, downsample = ctx.last_spec(k).out_channels, ctx.last_spec(k).downsample
            blocks = []
            for index in indices:
                target = specs[index]
                # One stride-2 block per sampled unit at a coarser resolution than the map so
                # far: where the backbone halves the map (and widens), so does the aux net.
                stride = 2 if target.downsample > downsample else 1
                blocks.append(ctx.model.make_stage_block(max(1, target.stage), channels, target.out_channels, stride))
                channels, downsample = target.out_channels, downsample * stride
            nets.append(AugLocalAux(blocks, channels, num_classes, indices))
        return nets
