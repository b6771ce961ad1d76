"""PredSim: prediction + similarity matching losses (Nokland and Eidnes 2019).

Each module but the last has two heads on its output ``h`` of shape ``(N, C, H, W)``:

- a prediction head: average pooling to ``s x s`` with ``C * s^2 <= hidden_dim`` (512),
  flatten, ``Linear -> num_classes`` with zero-initialised weights; trained by cross-entropy;
- a similarity head: ``conv3x3 C->C`` without bias; its output's similarity matrix is pulled
  towards the labels' similarity matrix by a mean squared error.

Module loss: ``(1 - beta) * CE + beta * sim``, ``beta = 0.99``. The optimizer steps after
each module's backward (``default_step = "per_module"``), as in the reference.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from fba.engine.bank import FeatureBank
from fba.methods import METHODS
from fba.methods.base import BuildContext, LocalMethod
from fba.methods.dgl import classifier_num_classes


def similarity_matrix(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Centred cosine similarity between the samples of a batch: ``(N, ...) -> (N, N)``.

    A 4-D map ``(N, C, H, W)`` with more than one position is first reduced to each
    channel's spatial standard deviation ``(N, C)``; a 1x1 map (whose standard deviation is
    undefined) is used as it is. Each sample's vector is centred on its own mean and scaled
    to unit length; entry ``(i, j)`` is the dot product of samples i and j, in ``[-1, 1]``.
    """
    if x.dim() == 4 and x.shape[2] * x.shape[3] > 1:
        x = x.flatten(2).std(dim=2)
    x = x.flatten(1)
    centred = x - x.mean(dim=1, keepdim=True)
    unit = centred / (centred.norm(dim=1, keepdim=True) + eps)
    return (unit @ unit.t()).clamp(-1.0, 1.0)


def prediction_pool_size(channels: int, hidden_dim: int) -> int:
    """Side ``s`` of the pooled map feeding the prediction head: the largest power of two
    with ``channels * s^2 <= hidden_dim``, at least 1.

    The reference halves the map (kernel 2, 4, 8, ...) until ``C * H' * W' <= hidden_dim``;
    on power-of-two maps (CIFAR's 32/16/8) that is the same size: 4x4 for C=16 and C=32,
    2x2 for C=64.
    """
    side = 1
    while channels * (2 * side) ** 2 <= hidden_dim:
        side *= 2
    return side


class PredSimAux(nn.Module):
    """Prediction and similarity heads of one module.

    ``forward(h) -> (logits (N, num_classes), similarity features (N, C, H, W))``.
    """

    def __init__(self, channels: int, num_classes: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.pool_size = prediction_pool_size(channels, hidden_dim)
        self.classifier = nn.Linear(channels * self.pool_size ** 2, num_classes)
        # Zero weights as in the reference: the prediction loss starts from the bias only,
        # so early on the similarity loss alone shapes the module.
        nn.init.zeros_(self.classifier.weight)
        self.similarity = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        pooled = F.adaptive_avg_pool2d(h, self.pool_size).flatten(1)
        return self.classifier(pooled), self.similarity(h)


@METHODS.register("predsim")
class PredSim(LocalMethod):
    """PredSim local losses.

    Args:
        beta: weight of the similarity loss; the cross-entropy gets ``1 - beta``.
        hidden_dim: upper bound on the prediction head's input size ``C * s^2``.

    The reference trained with Adam, lr 5e-4; this class fixes only the losses, the
    optimizer is the run's (the common SGD recipe unless the config overrides it).
    """

    name = "predsim"
    default_step = "per_module"

    def __init__(self, beta: float = 0.99, hidden_dim: int = 512) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"predsim.beta must be in [0, 1], got {beta}")
        if hidden_dim < 1:
            raise ValueError(f"predsim.hidden_dim must be >= 1, got {hidden_dim}")
        self.beta = beta
        self.hidden_dim = hidden_dim

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PredSim":
        return cls(beta=config["predsim"]["beta"])

    def build_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        if ctx.K == 1:
            return []
        num_classes = classifier_num_classes(ctx.model, self.name)
        return [PredSimAux(ctx.last_spec(k).out_channels, num_classes, self.hidden_dim) for k in range(ctx.K - 1)]

    def bind(self, ctx: BuildContext) -> None:
        super().bind(ctx)
        if ctx.K > 1:  # with K=1 no local loss runs, and any head is fine
            self.num_classes = classifier_num_classes(ctx.model, self.name)

    def similarity_loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """MSE between the similarity matrices of ``features (N, C, H, W)`` and of the
        one-hot ``labels (N,)``; computed in float32 (it is a small N x N problem)."""
        target = similarity_matrix(F.one_hot(labels, self.num_classes).float())
        return F.mse_loss(similarity_matrix(features.float()), target)

    def local_loss(self, k: int, aux: nn.Module, h: Tensor, targets: Tensor, bank: FeatureBank | None) -> Tensor:
        logits, features = aux(h)
        # Both terms always run, even at beta 0 or 1, so every aux parameter gets a gradient
        # (DDP expects each registered parameter to take part).
        return (1.0 - self.beta) * self.task.loss(logits, targets) + self.beta * self.similarity_loss(features, targets)
