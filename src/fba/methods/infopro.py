"""InfoPro: information propagation losses (Wang, Ni, Song, Yang and Huang 2021).

Each module but the last keeps information about the image (a reconstruction decoder) and
about the label (a small classifier head), with weights that move from reconstruction
towards the label as modules get deeper:

    loss_k = lambda1(k) * BCE(decoder(h), image in [0, 1]) + lambda2(k) * task_loss(head(h))

``(lambda1, lambda2)`` is interpolated linearly with ``ratio = k / (K - 2)`` from
``weights_first`` (module 0) to ``weights_last`` (module K-2, the last one with an aux net).
``task_loss`` is cross-entropy (``mode="ce"``) or a supervised contrastive loss on an
L2-normalised 128-d embedding (``mode="contrast"``). The last module uses the task head's
plain cross-entropy. One optimizer step per training step (``default_step = "global"``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fba.engine.bank import FeatureBank
from fba.engine.units import UnitModel
from fba.methods import METHODS
from fba.methods.base import BuildContext, LocalMethod
from fba.methods.dgl import classifier_num_classes

INFOPRO_MODES = ("ce", "contrast")
#: width of the 1c2f head's hidden layer, and of the contrastive embedding
HEAD_HIDDEN = 128
#: width of the reconstruction decoder's hidden layer
DECODER_HIDDEN = 12


def images_to_unit_range(images: Tensor, eps: float = 1e-6) -> Tensor:
    """Map normalised images ``(N, C, H, W)`` to ``[0, 1]`` by a per-image, per-channel min-max.

    The learner only sees normalised inputs, ``(x - mean) / std`` per channel; min-max undoes
    any such per-channel affine map, so this is the original image whenever each channel of
    it spans the full range [0, 1] (and otherwise that image with its contrast stretched).
    A constant channel maps to 0.
    """
    images = images.float()
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(eps)


def supervised_contrastive_loss(embeddings: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of ``embeddings (N, D)`` with ``labels (N,)``.

    Each anchor's loss is minus the mean, over the other samples of its class, of the log
    softmax of its cosine similarities / temperature (taken over every other sample).
    Anchors whose class has no other sample in the batch are left out (rather than producing
    a division by zero); a batch with no such pair gives a zero loss.
    """
    z = F.normalize(embeddings.float(), dim=1)
    n = z.shape[0]
    self_pairs = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temperature).masked_fill(self_pairs, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_pairs
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0  # keeps the graph, so every aux parameter still gets a (zero) gradient
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    # masked_fill (not a multiply by the mask): the diagonal is -inf, and -inf * 0 is NaN.
    positive_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(positive_log_prob[anchors] / counts[anchors]).mean()


class InfoProAux(nn.Module):
    """The ``1c2f`` classifier head and the reconstruction decoder of one module.

    Head: ``conv3x3 C->C' (stride s), BN, ReLU, GAP, Linear C'->128, ReLU, Linear 128->out``
    with ``(C', s) = (2C, 2)`` when ``widen`` else ``(C, 1)``.
    Decoder: bilinear upsampling to the image size, ``conv3x3 C->12, BN, ReLU,
    conv3x3 12->image_channels``; it returns logits, the sigmoid lives in the loss.

    ``forward(h (N, C, H, W), image_size (H0, W0)) -> (head output (N, out),
    reconstruction logits (N, image_channels, H0, W0))``.
    """

    def __init__(self, channels: int, out_features: int, image_channels: int, widen: bool) -> None:
        super().__init__()
        mid, stride = (2 * channels, 2) if widen else (channels, 1)
        self.head = nn.Sequential(
            nn.Conv2d(channels, mid, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
            nn.Linear(mid, HEAD_HIDDEN), nn.ReLU(inplace=True), nn.Linear(HEAD_HIDDEN, out_features),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, DECODER_HIDDEN, 3, padding=1, bias=False), nn.BatchNorm2d(DECODER_HIDDEN), nn.ReLU(inplace=True),
            nn.Conv2d(DECODER_HIDDEN, image_channels, 3, padding=1),
        )

    def forward(self, h: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        upsampled = F.interpolate(h, size=tuple(image_size), mode="bilinear", align_corners=False)
        return self.head(h), self.decoder(upsampled)


def image_channels_of(model: UnitModel) -> int:
    """Input channels of the backbone: those of the first convolution in its first unit."""
    for layer in model.units[0].modules():
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
    raise ValueError("infopro needs a backbone whose first unit has a convolution, to size its decoder")


@METHODS.register("infopro")
class InfoPro(LocalMethod):
    """InfoPro local losses.

    Args:
        mode: ``"contrast"`` (supervised contrastive, the setting the default weights were
            tuned for on ResNet-32 K=16) or ``"ce"`` (cross-entropy on class logits).
        weights_first: ``(lambda1, lambda2)`` = (reconstruction, task) weights of module 0.
        weights_last: ``(lambda1, lambda2)`` of module K-2, the last one with an aux net.
        temperature: temperature of the contrastive loss.
    """

    name = "infopro"
    default_step = "global"

    def __init__(self, mode: str = "contrast", weights_first: tuple[float, float] = (5.0, 0.05),
                 weights_last: tuple[float, float] = (0.2, 0.5), temperature: float = 0.07) -> None:
        if mode not in INFOPRO_MODES:
            raise ValueError(f"infopro.mode must be one of {INFOPRO_MODES}, got {mode!r}")
        if len(weights_first) != 2 or len(weights_last) != 2:
            raise ValueError(f"infopro weights are (lambda1, lambda2) pairs, got {weights_first!r} and {weights_last!r}")
        if temperature <= 0:
            raise ValueError(f"infopro.temperature must be > 0, got {temperature}")
        self.mode = mode
        self.weights_first = (float(weights_first[0]), float(weights_first[1]))
        self.weights_last = (float(weights_last[0]), float(weights_last[1]))
        self.temperature = temperature
        self.K = 1
        self._target_images: Tensor | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "InfoPro":
        opts = config["infopro"]
        return cls(mode=opts["mode"], weights_first=tuple(opts["weights_first"]),
                   weights_last=tuple(opts["weights_last"]), temperature=opts["temperature"])

    def loss_weights(self, k: int, K: int | None = None) -> tuple[float, float]:
        """``(lambda1, lambda2)`` of module k out of K (the bound K by default).

        ``ratio = k / (K - 2)``; with K <= 2 only module 0 has an aux net and gets
        ``weights_first``.
        """
        K = self.K if K is None else K
        ratio = k / (K - 2) if K > 2 else 0.0
        (r0, t0), (r1, t1) = self.weights_first, self.weights_last
        return r0 + (r1 - r0) * ratio, t0 + (t1 - t0) * ratio

    def build_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        if ctx.K == 1:
            return []
        num_classes = classifier_num_classes(ctx.model, self.name)
        out_features = HEAD_HIDDEN if self.mode == "contrast" else num_classes
        image_channels = image_channels_of(ctx.model)
        last_stage = max(spec.stage for spec in ctx.model.specs)
        nets = []
        for k in range(ctx.K - 1):
            spec = ctx.last_spec(k)
            # The reference widens (2C, stride 2) for its 16- and 32-channel maps and keeps
            # 64 channels: i.e. every map before the last stage, which is the rule that
            # carries over to other widths (torchvision's 64..2048).
            nets.append(InfoProAux(spec.out_channels, out_features, image_channels, widen=spec.stage < last_stage))
        return nets

    def bind(self, ctx: BuildContext) -> None:
        super().bind(ctx)
        self.K = ctx.K

    def begin_step(self, inputs: Tensor, targets: Tensor) -> None:
        # Computed once per step, shared by every module's decoder loss.
        self._target_images = images_to_unit_range(inputs) if self.K > 1 else None

    def local_loss(self, k: int, aux: nn.Module, h: Tensor, targets: Tensor, bank: FeatureBank | None) -> Tensor:
        images = self._target_images
        if images is None:
            raise RuntimeError("infopro.local_loss needs the step's images: call begin_step(inputs, targets) first")
        out, reconstruction = aux(h, images.shape[-2:])
        # BCE on logits equals BCE after the sigmoid, and is safe under autocast.
        reconstruction_loss = F.binary_cross_entropy_with_logits(reconstruction.float(), images)
        if self.mode == "contrast":
            task_loss = supervised_contrastive_loss(out, targets, self.temperature)
        else:
            task_loss = self.task.loss(out, targets)
        lambda1, lambda2 = self.loss_weights(k)
        return lambda1 * reconstruction_loss + lambda2 * task_loss
