"""Auxiliary networks and the feature bank of local learning for super-resolution.

- :class:`SRLocalModule` is FBA's Simple Local Module for SR: a fresh ResBlock (the stage
  tail, EDSR's only block type), the early full-resolution map from the bank added back
  in (the same global skip the main network has), and a reconstruction tail.
- :class:`EarlyMapBank` is the SR bank: the head conv's map of the current batch, detached.
- :class:`ConvReconstructionAux` is DGL's auxiliary network adapted to SR: a few plain
  convolutions and a reconstruction tail, with no bank.

The ``build_*`` functions at the end are what this task offers each method (registered in
``plugin.py``): FBA's SLMs and bank, DGL's auxiliary network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from fba.engine.bank import StepOnlyBank
from fba.tasks.super_resolution.models import EarlyMap

if TYPE_CHECKING:
    from fba.methods.base import BuildContext
    from fba.methods.fba import FBA


class SRLocalModule(nn.Module):
    """``forward(h, early=None) -> (sr, None)``: ``(N, F, h, w) -> (N, 3, h*s, w*s)``.

    ``tail(adapter(narrow(block(h)) + early_proj(early)))``, each optional part skipped when None.

    Args:
        block: a fresh ResBlock on the module's features.
        tail: a reconstruction tail (fresh, or the main network's when shared).
        narrow: 1x1 conv to the SLM's reduced width (``fba.reduction``).
        adapter: 1x1 conv from the reduced width to a shared tail's width.
        early_proj: 1x1 conv from the early map's width to the SLM's when they differ.
    """

    def __init__(self, block: nn.Module, tail: nn.Module, narrow: nn.Module | None = None,
                 adapter: nn.Module | None = None, early_proj: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.narrow = narrow
        self.early_proj = early_proj
        self.adapter = adapter
        self.tail = tail

    def forward(self, h: Tensor, early: Tensor | None = None) -> tuple[Tensor, None]:
        z = self.block(h)
        if self.narrow is not None:
            z = self.narrow(z)
        if early is not None:
            # The main network's global skip, rebuilt with the bank's detached copy: the tail sees
            # the fine detail of the early map, so this module need only learn the residual.
            z = z + (self.early_proj(early) if self.early_proj is not None else early)
        if self.adapter is not None:
            z = self.adapter(z)
        return self.tail(z), None


class EarlyMapBank(StepOnlyBank):
    """The feature bank for SR: the head conv's output for the current batch, detached.

    It is the tensor the main network keeps anyway for its global skip, so it costs no
    compute and no memory beyond a reference; memory reports count it as an activation (the
    bank stores no tensors of its own). Implements the engine's bank interface.
    """

    def __init__(self, early: EarlyMap) -> None:
        self.early = early

    def begin_step(self, indices: Tensor | None) -> None:
        pass

    def write(self, k: int, h: Tensor) -> None:
        pass  # the head unit records the map itself

    def read(self, k: int, device) -> tuple[Tensor | None, None]:
        value = self.early.value
        return (value.detach() if value is not None else None), None

    def end_step(self) -> None:
        pass

    def step_features(self) -> dict[int, Tensor]:
        return {}  # nothing beyond the early map, which the model itself carries


class ConvReconstructionAux(nn.Module):
    """DGL-style SR auxiliary network: ``depth`` x [conv3x3, ReLU], then a reconstruction tail."""

    def __init__(self, features: int, tail: nn.Module, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.tail = tail

    def forward(self, h: Tensor) -> Tensor:
        return self.tail(self.body(h))


# --------------------------------------------------------------------------- offered to methods

def build_fba_slms(method: "FBA", ctx: "BuildContext") -> list[nn.Module]:
    """FBA's K-1 SLMs for SR (paper Fig. 4): fresh ResBlock + early map from the bank + reconstruction tail.

    Module k's SLM maps ``(N, F, h, w)`` (and the early map ``(N, F0, h, w)``) to ``(N, 3, h*s, w*s)``.

    Raises:
        ValueError: a bank source or usage other than the early map fused as input.
    """
    if method.bank_source not in ("none", "inpass") or (method.bank_source == "inpass" and method.bank_usage != "input"):
        raise ValueError("the super-resolution bank is the early full-resolution map of the current batch, "
                         "fused as input: use fba.bank.source=inpass (or none) with fba.bank.usage=input")
    features = ctx.model.specs[-1].out_channels
    early_channels = ctx.model.specs[0].out_channels
    nets: list[nn.Module] = []
    for k in range(ctx.K - 1):
        spec = ctx.last_spec(k)
        channels = max(1, spec.out_channels // method.reduction)
        block = ctx.model.make_stage_block(max(1, spec.stage), spec.out_channels, spec.out_channels)
        # Channel reduction narrows what the SLM's tail upsamples: its full-resolution maps
        # are the SLM's largest tensors, so they set its memory.
        narrow = nn.Conv2d(spec.out_channels, channels, 1) if channels != spec.out_channels else None
        early_proj = nn.Conv2d(early_channels, channels, 1) if method.bank_source != "none" and channels != early_channels else None
        if method.share_head:
            tail = ctx.model.head
            adapter = nn.Conv2d(channels, features, 1) if channels != features else None
        else:
            tail, adapter = ctx.model.make_head(channels), None
        nets.append(SRLocalModule(block, tail, narrow=narrow, adapter=adapter, early_proj=early_proj))
    return nets


def build_fba_bank(method: "FBA", ctx: "BuildContext") -> EarlyMapBank:
    """FBA's bank for SR: the early map the model's head unit records (FBA asks only when it has a bank)."""
    return EarlyMapBank(ctx.model.early_map)  # type: ignore[attr-defined]


def build_dgl_aux(ctx: "BuildContext", k: int) -> nn.Module:
    """DGL's auxiliary network for module k: two conv3x3-ReLU and a fresh reconstruction tail,
    ``(N, F, h, w) -> (N, 3, h*s, w*s)``, and no bank (the early map is what FBA adds)."""
    channels = ctx.last_spec(k).out_channels
    return ConvReconstructionAux(channels, ctx.model.make_head(channels))
