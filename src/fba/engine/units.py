"""The contract between a task model and the engine: ordered units plus a head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class UnitSpec:
    """Shape facts about one backbone unit's output.

    Attributes:
        name: dotted path of the unit inside the plain model (``"layer2.3"``).
        out_channels: channels of the unit's output map.
        downsample: total spatial stride of the output relative to the input image.
        stage: stage index; 0 is the stem, ResNet stages are 1..S.
    """

    name: str
    out_channels: int
    downsample: int
    stage: int


@dataclass
class UnitModel:
    """A backbone cut into units, a task head, and the plain model they live in.

    ``units`` and ``head`` share their parameters with ``plain``: training the units trains
    the plain model, and ``plain`` is what inference and export use.

    Attributes:
        plain: the ordinary inference model (e.g. a torchvision ``ResNet``).
        units: ordered backbone units; ``head(units[-1](...units[0](x)))`` equals ``plain(x)``.
        specs: one :class:`UnitSpec` per unit.
        head: maps the last unit's output to the task output.
        make_stage_block: ``(stage, in_channels, out_channels, stride=1) -> nn.Module``, a
            freshly initialised block with the architecture of that stage's last block
            (stride 1 unless asked; an architecture without strided blocks may refuse stride > 1).
        make_head: ``(in_channels) -> nn.Module``, a fresh head of the task's own type.
        set_partition: called once with the K groups of unit indices, for models whose
            units share state across unit boundaries (EDSR's global skip).
    """

    plain: nn.Module
    units: list[nn.Module]
    specs: list[UnitSpec]
    head: nn.Module
    make_stage_block: Callable[..., nn.Module]
    make_head: Callable[[int], nn.Module]
    set_partition: Callable[[list[list[int]]], None] | None = None
