"""DGL: Decoupled Greedy Learning (Belilovsky, Eickenberg and Oyallon 2020).

Every module but the last is trained by a small auxiliary network and cross-entropy, and
its optimizer steps right after its own backward (``default_step = "per_module"``).

The auxiliary network depends on the task. Classification uses DGL's ``mlp-sr`` network
(:class:`MLPSRClassifierAux`); another task plugs its own in by adding a builder to
:attr:`DGL.aux_builders` under the task's name.
"""

from __future__ import annotations

import math
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from fba.engine.units import UnitModel
from fba.methods import METHODS
from fba.methods.base import BuildContext, LocalMethod


def classifier_num_classes(model: UnitModel, method: str) -> int:
    """Number of classes of a classification model, read from its head's final linear layer.

    Raises:
        ValueError: the head is not a classifier (``head.fc`` is not an ``nn.Linear``), i.e.
            the method's classification auxiliary network does not apply to this task.
    """
    fc = getattr(model.head, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"{method} builds classification auxiliary networks, but the model's head "
                         f"({type(model.head).__name__}) is not a classifier with a linear 'fc' layer")
    return fc.out_features


class MLPSRClassifierAux(nn.Module):
    """DGL's ``mlp-sr`` auxiliary classifier: ``(N, C, H, W) -> (N, num_classes)``.

    Average pool to ``ceil(H/4) x ceil(W/4)``; three ``[conv1x1 C->C (no bias), BN, ReLU]``;
    average pool to 2x2 and flatten to ``(N, 4C)``; two ``[Linear 4C->4C (no bias), BN1d,
    ReLU]``; ``Linear 4C -> num_classes``.

    The first pooling size is taken from the map at run time (the reference fixes it from the
    known input size), so the same network serves any image size.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        for _ in range(3):
            convs += [nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        width = 4 * channels
        mlp: list[nn.Module] = []
        for _ in range(2):
            mlp += [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*mlp)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        height, width = h.shape[-2:]
        z = F.adaptive_avg_pool2d(h, (math.ceil(height / 4), math.ceil(width / 4)))
        z = F.adaptive_avg_pool2d(self.convs(z), 2).flatten(1)  # (N, 4C)
        return self.fc(self.mlp(z))


def build_mlp_sr_classifier_aux(ctx: BuildContext, k: int) -> nn.Module:
    """DGL's classification auxiliary network for module k (sized to its output channels)."""
    return MLPSRClassifierAux(ctx.last_spec(k).out_channels, classifier_num_classes(ctx.model, "dgl"))


def build_conv_reconstruction_aux(ctx: BuildContext, k: int) -> nn.Module:
    """DGL's super-resolution auxiliary network for module k: two conv3x3-ReLU and a fresh
    reconstruction tail, and no bank (the early map is what FBA adds)."""
    from fba.tasks.super_resolution.local import ConvReconstructionAux

    return ConvReconstructionAux(ctx.last_spec(k).out_channels, ctx.model.make_head(ctx.last_spec(k).out_channels))


#: ``(ctx, k) -> auxiliary network of module k``
AuxBuilder = Callable[[BuildContext, int], nn.Module]


@METHODS.register("dgl")
class DGL(LocalMethod):
    """Decoupled Greedy Learning: a task-specific aux net per module, the task's own loss.

    No hyperparameters of its own: the auxiliary network is fixed by the task (see
    :attr:`aux_builders`) and the loss is the task's loss.
    """

    name = "dgl"
    default_step = "per_module"
    #: task name -> builder of module k's auxiliary network. A task adds its entry here
    #: (e.g. ``DGL.aux_builders["super_resolution"] = build_sr_aux``).
    aux_builders: dict[str, AuxBuilder] = {"classification": build_mlp_sr_classifier_aux,
                                           "super_resolution": build_conv_reconstruction_aux}

    def build_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        if ctx.K == 1:
            return []
        builder = self.aux_builders.get(ctx.task.name)
        if builder is None:
            raise ValueError(f"dgl has no auxiliary network for task {ctx.task.name!r}; "
                             f"available for: {', '.join(sorted(self.aux_builders))}")
        return [builder(ctx, k) for k in range(ctx.K - 1)]
