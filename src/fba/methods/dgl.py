"""DGL: Decoupled Greedy Learning (Belilovsky, Eickenberg and Oyallon 2020).

Every module but the last is trained by a small auxiliary network and cross-entropy, and
its optimizer steps right after its own backward (``default_step = "per_module"``).

The auxiliary network depends on the task, so the task provides it: its plugin offers
``dgl`` an ``"aux"`` builder (:mod:`fba.tasks.plugin`). DGL's own ``mlp-sr`` classifier
(:class:`MLPSRClassifierAux`) lives here, for the tasks that choose it.
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
        raise ValueError(f"{method} builds classifier auxiliary networks, but the model's head "
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


#: ``(ctx, k) -> auxiliary network of module k``, what a task offers as DGL's ``"aux"`` part
AuxBuilder = Callable[[BuildContext, int], nn.Module]


@METHODS.register("dgl")
class DGL(LocalMethod):
    """Decoupled Greedy Learning: a task-specific aux net per module, the task's own loss.

    No hyperparameters of its own: the auxiliary network is the task's (its ``"aux"`` part
    for ``dgl``) and the loss is the task's loss.
    """

    name = "dgl"
    default_step = "per_module"

    def build_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        if ctx.K == 1:
            return []
        builder: AuxBuilder | None = ctx.task_part(self.name, "aux")
        if builder is None:
            from fba.tasks import tasks_offering

            raise ValueError(f"dgl has no auxiliary network for task {ctx.task.name!r}; "
                             f"available for: {', '.join(tasks_offering(self.name, 'aux'))}")
        return [builder(ctx, k) for k in range(ctx.K - 1)]
