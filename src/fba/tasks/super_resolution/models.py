"""EDSR (Lim et al. 2017) exposed as units + head (see :class:`fba.engine.units.UnitModel`).

Images are float tensors in [0, 1]; the mean shift works on that range.

- ``edsr_baseline``: 16 ResBlocks x 64 features, residual scale 1 (about 1.4 M parameters at x2).
- ``edsr_large``: 32 ResBlocks x 256 features, residual scale 0.1 (about 40.7 M at x2).
- ``edsr_tiny``: 4 x 16, for tests.

Units: the head conv (with the input mean shift), every ResBlock, and the body conv that
closes the global skip. The task head is the reconstruction tail: pixel-shuffle upsampler,
last conv and the output mean shift. The global skip adds the head conv's output to the
body conv's output; when those two units fall in different local modules, the body conv
reads that early map *detached* (it comes from another module, whose graph is gone), which
is exactly the early full-resolution feature that FBA's bank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from fba.engine.checkpointing import PerSampleModule

from fba.engine.units import UnitModel, UnitSpec
from fba.registry import Registry

SR_MODELS: Registry[Callable[..., UnitModel]] = Registry("model")

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
SCALES = (2, 3, 4)


class MeanShift(nn.Module):
    """Adds ``sign * mean`` per channel; the mean is a buffer, so it is saved but never trained."""

    def __init__(self, mean: tuple[float, float, float] = DIV2K_RGB_MEAN, sign: int = -1) -> None:
        super().__init__()
        self.register_buffer("shift", sign * torch.tensor(mean).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift


class ResBlock(nn.Module):
    """conv3x3-ReLU-conv3x3 with a scaled identity shortcut, no BatchNorm: ``(N,F,H,W) -> (N,F,H,W)``."""

    def __init__(self, features: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(features, features, 3, padding=1))
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        residual = self.body(x)
        return x + (residual * self.res_scale if self.res_scale != 1 else residual)


class Upsampler(nn.Sequential):
    """Sub-pixel convolution: x2 and x3 in one conv + PixelShuffle, x4 as two x2 stages."""

    def __init__(self, scale: int, features: int) -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale}")
        factors = [2, 2] if scale == 4 else [scale]
        layers: list[nn.Module] = []
        for factor in factors:
            layers += [nn.Conv2d(features, features * factor * factor, 3, padding=1), nn.PixelShuffle(factor)]
        super().__init__(*layers)


class ReconstructionTail(PerSampleModule):
    """The SR task head: ``(N, F, h, w) -> (N, 3, h*scale, w*scale)`` image in [0, 1] scale.

    Holds the upsampler, the last conv and the output mean shift. FBA's Simple Local
    Modules use fresh copies of this (or the main one, with ``share_tail``).
    """

    def __init__(self, scale: int, features: int, out_channels: int = 3) -> None:
        super().__init__()
        self.scale = scale
        self.upsampler = Upsampler(scale, features)
        self.conv = nn.Conv2d(features, out_channels, 3, padding=1)
        self.add_mean = MeanShift(sign=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.add_mean(self.conv(self.upsampler(h)))


class EarlyMap:
    """The head conv's output of the current forward, read by the global skip (and the bank).

    ``detach`` is set by :meth:`EDSR.set_partition`: True when the head conv and the body
    conv are in different local modules.
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.detach = False

    def read(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("the global skip was read before the head conv ran in this forward")
        return self.value.detach() if self.detach else self.value


class HeadUnit(nn.Module):
    """Input mean shift + head conv: ``(N, 3, h, w) -> (N, F, h, w)``; records the early map."""

    def __init__(self, sub_mean: MeanShift, conv: nn.Conv2d, early: EarlyMap) -> None:
        super().__init__()
        self.sub_mean, self.conv = sub_mean, conv
        object.__setattr__(self, "early", early)  # shared state, not a submodule

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(self.sub_mean(x))
        self.early.value = out
        return out


class BodyEndUnit(nn.Module):
    """Body conv + global skip: ``(N, F, h, w) -> (N, F, h, w)``."""

    def __init__(self, conv: nn.Conv2d, early: EarlyMap) -> None:
        super().__init__()
        self.conv = conv
        object.__setattr__(self, "early", early)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(h) + self.early.read()


class EDSR(nn.Module):
    """Enhanced Deep Super-Resolution network: ``(N, 3, h, w) -> (N, 3, h*scale, w*scale)``.

    Args:
        scale: 2, 3 or 4.
        num_blocks: ResBlocks in the body.
        features: channels of every body map.
        res_scale: scale of each ResBlock's residual branch (0.1 for the large model).
        in_channels: image channels.
    """

    #: prefixes of the weights that a model of another scale cannot reuse (x2 -> x3/x4 init).
    scale_specific = ("tail.upsampler.",)

    def __init__(self, scale: int = 2, num_blocks: int = 16, features: int = 64, res_scale: float = 1.0,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.scale = scale
        self.sub_mean = MeanShift(sign=-1)
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(features, res_scale) for _ in range(num_blocks)])
        self.body_conv = nn.Conv2d(features, features, 3, padding=1)
        self.tail = ReconstructionTail(scale, features, in_channels)

    def forward(self, x: Tensor) -> Tensor:
        early = self.head(self.sub_mean(x))
        return self.tail(self.body_conv(self.body(early)) + early)


@dataclass
class EDSRUnitModel(UnitModel):
    """EDSR units plus the early map that the global skip (and FBA's bank) read."""

    early_map: EarlyMap = field(default_factory=EarlyMap)


def edsr_unit_model(net: EDSR) -> UnitModel:
    """Cut an :class:`EDSR` into units: head conv, each ResBlock, body conv (+ global skip)."""
    early = EarlyMap()
    features = net.head.out_channels
    res_scale = net.body[0].res_scale if len(net.body) else 1.0
    units: list[nn.Module] = [HeadUnit(net.sub_mean, net.head, early), *net.body, BodyEndUnit(net.body_conv, early)]
    specs = [UnitSpec("head", features, 1, 0)]
    specs += [UnitSpec(f"body.{i}", features, 1, 1) for i in range(len(net.body))]
    specs.append(UnitSpec("body_conv", features, 1, 1))

    def stage_block(stage: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        if stride != 1 or in_channels != out_channels:
            raise ValueError("EDSR blocks keep resolution and width: stride 1 and in_channels == out_channels only")
        return ResBlock(out_channels, res_scale)

    def set_partition(groups: list[list[int]]) -> None:
        # The body conv reads the head conv's map with gradient only inside one module.
        owner = {unit: k for k, group in enumerate(groups) for unit in group}
        early.detach = owner[0] != owner[len(units) - 1]

    return EDSRUnitModel(plain=net, units=units, specs=specs, head=net.tail, make_stage_block=stage_block,
                         make_head=lambda channels: ReconstructionTail(net.scale, channels, net.tail.conv.out_channels),
                         set_partition=set_partition, early_map=early)


def _edsr(num_blocks: int, features: int, res_scale: float, doc: str) -> Callable[..., UnitModel]:
    def build(scale: int = 2, in_channels: int = 3) -> UnitModel:
        return edsr_unit_model(EDSR(scale, num_blocks, features, res_scale, in_channels))

    build.__doc__ = doc
    return build


SR_MODELS.register("edsr_baseline")(_edsr(16, 64, 1.0, "EDSR baseline: 16 ResBlocks x 64 features, 18 units."))
SR_MODELS.register("edsr_large")(_edsr(32, 256, 0.1, "EDSR large: 32 ResBlocks x 256 features, residual scale 0.1, 34 units."))
SR_MODELS.register("edsr_tiny")(_edsr(4, 16, 1.0, "Tiny EDSR for tests: 4 ResBlocks x 16 features, 6 units."))
