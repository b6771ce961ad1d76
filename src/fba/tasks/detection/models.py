"""Detection models exposed as units + head (see :class:`fba.engine.units.UnitModel`).

Images enter in [0, 1]; the ImageNet normalisation happens inside the model. Everything is
trained from scratch: ``weights=None`` everywhere, BatchNorm (training mode, not
``FrozenBatchNorm2d``) in the ResNet, GroupNorm in the heads.

- ``retinanet_resnet{18,34,50,101,152}``: torchvision's own RetinaNet. The plain model *is* a
  :class:`torchvision.models.detection.RetinaNet` built by :func:`torchvision_retinanet`
  (ResNet-FPN backbone, P3-P7, ``AnchorGenerator``, ``RetinaNetHead`` with GroupNorm and its
  focal and L1 box losses, ``Matcher``, ``BoxCoder``, ``batched_nms`` in its postprocess),
  so its ``state_dict`` loads strictly into the object that function builds with
  torchvision alone.
- ``yolov1_resnet{18,34,50,101,152}``: YOLOv1 (Redmon et al. 2016) on the same ResNets: an
  S x S grid of B boxes and C class probabilities per cell, the sum-squared loss, NMS.

Units are the stem (conv1-bn1-relu-maxpool, with the input normalisation) and then every
residual block; the head is everything after the last block.

**How the head gets C3 and C4.** The FPN needs the outputs of the last blocks of layer2
(C3) and layer3 (C4), which are earlier units, but units pass one tensor from module to
module. Those two units are wrapped in :class:`TappedBlock`, which records its output in a
per-forward side channel, :class:`PyramidTaps`, that the head reads (as EDSR's global skip
reads :class:`~fba.tasks.super_resolution.models.EarlyMap`). The stem records the batch's
image geometry there too (anchors and box rescaling need it). ``set_partition`` marks a tap
*detached* when its unit lies in another local module than the last unit: inside the last
module the map keeps its graph, across a module boundary the last module's loss must not
reach an earlier module (gradient isolation). With K=1 nothing is detached, so K=1 is BP.
The head reads the maps once and clears them, so a detached copy does not outlive the step.

**Heads and losses.** In training a head returns a :class:`DetectionTrainingOutput`; its
``losses(targets)`` gives torchvision's loss dict (``{"classification", "bbox_regression"}``
for RetinaNet). In eval a head returns torchvision's list of ``{"boxes", "scores",
"labels"}``, one per image, boxes in pixels of the input image (a :class:`Detections`
list, which also carries the loss for validation).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from fba.engine.checkpointing import is_recomputing
from fba.engine.chunked_bn import ChunkedConvBN
from fba.engine.units import UnitModel, UnitSpec
from fba.registry import Registry
from fba.tasks.classification.models import make_stage_block as _resnet_block
from fba.tasks.classification.models import stage_blocks
from fba.tasks.detection.plugin import BOX_LOSSES
from fba.tasks.detection.task import Targets, targets_to

MODELS: Registry[Callable[..., UnitModel]] = Registry("model")

DEPTHS = (18, 34, 50, 101, 152)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: RetinaNet's anchor base sizes on P3..P7 for inputs of 512 px and more (4 x the level's stride)
BASE_ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
FPN_CHANNELS = 256
#: the ResNet layers whose outputs feed the FPN (C3, C4, C5)
FPN_LAYERS = (2, 3, 4)


# ---- anchors -----------------------------------------------------------------------------------
def default_anchor_sizes(image_size: int) -> tuple[int, ...]:
    """Base anchor size of each level P3..P7 for square inputs of ``image_size`` pixels.

    From 512 px up, torchvision's and the paper's 32, 64, 128, 256, 512 (4 x each level's
    stride). Smaller inputs scale them down with the image, so an object keeps the same
    anchor relative to the image: 128 px gives 8, 16, 32, 64, 128 and 160 px gives
    10, 20, 40, 80, 160.
    """
    scale = min(1.0, image_size / 512)
    return tuple(max(1, int(round(s * scale))) for s in BASE_ANCHOR_SIZES)


def anchor_generator(anchor_sizes: Sequence[float]) -> AnchorGenerator:
    """torchvision's RetinaNet anchors: three octave scales (x, x 2^(1/3), x 2^(2/3)) of each
    level's base size, at aspect ratios 0.5, 1 and 2 (9 anchors per location)."""
    if len(anchor_sizes) != len(BASE_ANCHOR_SIZES):
        raise ValueError(f"anchor_sizes needs one base size per level P3..P7 (5), got {list(anchor_sizes)}")
    sizes = tuple((int(x), int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in anchor_sizes)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))


# ---- the torchvision RetinaNet -------------------------------------------------------------------
def c5_channels(depth: int) -> int:
    """Channels of a ResNet's last stage: 512 (BasicBlock) or 2048 (Bottleneck)."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {DEPTHS}, got {depth}")
    return 512 if depth < 50 else 2048


def torchvision_retinanet(depth: int, num_classes: int, image_size: int,
                          anchor_sizes: Sequence[float] | None = None, fpn_channels: int = FPN_CHANNELS,
                          box_loss: str = "l1") -> RetinaNet:
    """The torchvision RetinaNet that ``retinanet_resnet<depth>`` is, built by torchvision alone.

    An exported model's ``state_dict`` loads into this object with ``strict=True`` and gives
    the same detections. Settings:

    - backbone: ``BackboneWithFPN(resnet<depth>(weights=None, norm_layer=nn.BatchNorm2d),
      {"layer2": "0", "layer3": "1", "layer4": "2"}, [C3, C4, C5 channels], fpn_channels,
      extra_blocks=LastLevelP6P7(C5 channels, fpn_channels))``: P3-P7, P6 from C5 as in the
      paper. With ``fpn_channels=256`` this is exactly ``resnet_fpn_backbone(backbone_name=...,
      weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5, returned_layers=[2, 3, 4],
      extra_blocks=LastLevelP6P7(C5 channels, 256))``, which has no width argument;
    - anchors: :func:`anchor_generator` of ``anchor_sizes`` (default
      :func:`default_anchor_sizes`);
    - head: ``RetinaNetHead(fpn_channels, 9, num_classes, norm_layer=partial(nn.GroupNorm, 32))``
      with ``head.regression_head._loss_type = box_loss``: ``"l1"`` on the encoded deltas
      (torchvision's RetinaNet v1) or ``"giou"`` on the decoded boxes (its
      ``retinanet_resnet50_fpn_v2``); a training setting only, not part of the weights;
    - transform: ``min_size=max_size=image_size``, ImageNet mean and std, so a square input
      of ``image_size`` is normalised and not resized; other score/NMS settings are
      torchvision's defaults.

    ``num_classes`` counts object classes only (labels 0..num_classes-1): RetinaNet's
    sigmoid classifier has no background class. ``fpn_channels`` must be a multiple of 32
    (the head's GroupNorm groups).
    """
    if fpn_channels <= 0 or fpn_channels % 32:
        raise ValueError(f"fpn_channels must be a positive multiple of 32 (GroupNorm(32) in the head), "
                         f"got {fpn_channels}")
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    c5 = c5_channels(depth)
    # Built in resnet_fpn_backbone's order (P6P7, ResNet, FPN), so a seed gives its weights.
    extra_blocks = LastLevelP6P7(c5, fpn_channels)
    body = getattr(tv_resnet, f"resnet{depth}")(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(body, {f"layer{layer}": str(i) for i, layer in enumerate(FPN_LAYERS)},
                               [c5 // 2 ** (FPN_LAYERS[-1] - layer) for layer in FPN_LAYERS], fpn_channels,
                               extra_blocks=extra_blocks)
    anchors = anchor_generator(anchor_sizes or default_anchor_sizes(image_size))
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 32))
    head.regression_head._loss_type = box_loss
    return RetinaNet(backbone, num_classes, min_size=image_size, max_size=image_size, image_mean=list(IMAGENET_MEAN),
                     image_std=list(IMAGENET_STD), anchor_generator=anchors, head=head)


# ---- the side channel between units and head ---------------------------------------------------
class PyramidTaps:
    """Per-forward side channel: the batch's image geometry and the earlier stage maps.

    The stem calls :meth:`begin`; each :class:`TappedBlock` calls :meth:`record`; the head
    calls :meth:`read`. It holds no parameters and, besides the recorded maps (cleared when
    read), only Python sizes.

    Attributes:
        keys: unit indices whose outputs are recorded, in pyramid order (C3, C4).
        detach: per key, whether the head reads that map detached (set by
            :meth:`set_partition`: the unit is in another local module than the head).
        batch_shape: ``(H, W)`` of the (padded) batch the backbone ran on.
        image_sizes: ``(h, w)`` of each image inside the batch, after the transform.
        original_sizes: ``(h, w)`` of each image as it was given.
    """

    def __init__(self, keys: Sequence[int] = ()) -> None:
        self.keys = tuple(keys)
        self.detach = {key: False for key in self.keys}
        self.values: dict[int, Tensor] = {}
        self.batch_shape: tuple[int, int] | None = None
        self.image_sizes: list[tuple[int, int]] = []
        self.original_sizes: list[tuple[int, int]] = []

    def begin(self, batch_shape: Sequence[int], image_sizes: Sequence[Sequence[int]],
              original_sizes: Sequence[Sequence[int]]) -> None:
        # A checkpointed module's backward re-runs its stem and blocks: that must not forget
        # the maps its first forward recorded for the head of a later module.
        if is_recomputing():
            return
        self.values = {}
        self.batch_shape = (int(batch_shape[0]), int(batch_shape[1]))
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        self.original_sizes = [(int(h), int(w)) for h, w in original_sizes]

    def record(self, key: int, value: Tensor) -> None:
        if not is_recomputing():
            self.values[key] = value

    def read(self) -> list[Tensor]:
        """The recorded maps in pyramid order (detached where marked), then forgets them."""
        missing = [key for key in self.keys if key not in self.values]
        if missing:
            raise RuntimeError(f"the head ran before units {missing} recorded their maps in this forward")
        maps = [self.values[key].detach() if self.detach[key] else self.values[key] for key in self.keys]
        self.values = {}
        return maps

    def set_partition(self, groups: list[list[int]]) -> None:
        owner = {unit: k for k, group in enumerate(groups) for unit in group}
        last = max(owner)
        self.detach = {key: owner[key] != owner[last] for key in self.keys}

    def image_list(self, like: Tensor) -> ImageList:
        """An ``ImageList`` for torchvision's anchor generator, which reads only the batch's
        shape and the number of images: a zero-channel stand-in keeps no image alive."""
        if self.batch_shape is None:
            raise RuntimeError("the head ran before the stem recorded the image sizes")
        stand_in = like.new_empty((len(self.image_sizes), 0, *self.batch_shape))
        return ImageList(stand_in, list(self.image_sizes))


def check_targets(targets: Targets, batch_size: int, num_classes: int) -> None:
    """Refuse, with one line, targets that the losses would misread: not one per image, a
    ``boxes`` that is not ``(M, 4)``, ``labels`` not ``(M,)`` integers in ``0..num_classes-1``.

    The dataset readers check their files; this guards ``learner.train_step`` called directly,
    where a label out of range would be a raw indexing error (a device assert on CUDA) and a
    missing target would silently train that image as background.
    """
    if len(targets) != batch_size:
        raise ValueError(f"{len(targets)} targets for a batch of {batch_size} images")
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise ValueError(f"target {i} must be a dict with 'boxes' and 'labels', got {type(target).__name__}")
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"target {i}: 'boxes' must be a (M, 4) tensor of xyxy pixels, got "
                             f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
        if (not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1] or labels.is_floating_point()
                or labels.is_complex()):
            raise ValueError(f"target {i}: 'labels' must be a ({len(boxes)},) integer tensor, got "
                             f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__} "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else ''}".rstrip())
    # The range of all images' labels at once: one host sync per loss call, not two per image
    # (every module's loss of a step calls this).
    present = [t["labels"] for t in targets if t["labels"].numel()]
    if not present:
        return
    low, high = torch.stack(torch.aminmax(torch.cat(present))).tolist()
    if low >= 0 and high < num_classes:
        return
    for i, target in enumerate(targets):
        labels = target["labels"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"target {i}: labels must be 0-based class indices below {num_classes}, got "
                             f"{int(labels.min())}..{int(labels.max())}")


def prepare_targets(targets: Targets, original_sizes: Sequence[tuple[int, int]],
                    image_sizes: Sequence[tuple[int, int]], device: torch.device, num_classes: int) -> Targets:
    """Targets checked (:func:`check_targets`) and on ``device`` (the trainer may leave them on
    the CPU), their boxes mapped into the transformed images as torchvision's transform maps
    them (a no-op when the transform kept each image's size, as in training)."""
    check_targets(targets, len(image_sizes), num_classes)
    out = []
    for target, original, size in zip(targets_to(targets, device), original_sizes, image_sizes):
        if tuple(original) != tuple(size):
            target["boxes"] = resize_boxes(target["boxes"], list(original), list(size))
        out.append(target)
    return out


class TappedBlock(nn.Module):
    """A residual block whose output the head also reads: ``(N, C, H, W) -> (N, C', H', W')``."""

    def __init__(self, block: nn.Module, taps: PyramidTaps, key: int) -> None:
        super().__init__()
        self.block = block
        self.key = key
        object.__setattr__(self, "taps", taps)  # shared state, not a submodule

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        self.taps.record(self.key, out)
        return out


# ---- what heads return ------------------------------------------------------------------------
class DetectionTrainingOutput:
    """A head's training output: its raw predictions and the loss that compares them with targets.

    Attributes:
        predictions: the head's raw outputs (e.g. ``cls_logits`` ``(N, HWA, C)`` and
            ``bbox_regression`` ``(N, HWA, 4)``; YOLO's ``grid`` ``(N, S, S, 5B + C)``).
    """

    def __init__(self, predictions: dict[str, Any], compute: Callable[[Targets], dict[str, Tensor]]) -> None:
        self.predictions = predictions
        self._compute = compute

    def losses(self, targets: Targets) -> dict[str, Tensor]:
        """``targets``: one dict per image with ``boxes`` ``(M, 4)`` xyxy pixels and ``labels``
        ``(M,)`` int64 -> named scalar losses (their sum is the training loss)."""
        return self._compute(targets)


#: the batch's classification logits from which :func:`retinanet_loss` checkpoints the focal
#: loss: below it the saved intermediates are small and the recomputation is not worth its
#: time (at the built-in 128 px run, 0.6 MiB of logits, it would add about 50 ms to each of
#: the 4 loss calls of an FBA step of 0.7 s); at 512 px, batch 8 and 20 classes they are 31 MiB
LOSS_CHECKPOINT_MIN_BYTES = 16 * 2**20


def retinanet_loss(net: RetinaNet, targets: Targets, head_outputs: dict[str, Tensor], anchors: list[Tensor],
                   checkpoint_from_bytes: int = LOSS_CHECKPOINT_MIN_BYTES) -> dict[str, Tensor]:
    """torchvision's ``net.compute_loss``; for large logits one image at a time, each checkpointed.

    ``head_outputs``: ``cls_logits`` ``(N, HWA, C)`` and ``bbox_regression`` ``(N, HWA, 4)``;
    ``anchors``: N tensors ``(HWA, 4)`` -> ``{"classification", "bbox_regression"}`` scalars,
    equal to ``net.compute_loss(targets, head_outputs, anchors)``: torchvision normalises each
    image's losses by its own foreground count and then averages over the images, so the
    mean of the one-image losses is the batch loss.

    Why: the sigmoid focal loss keeps about eight tensors of the logits' size for its
    backward (sigmoid, BCE, p_t, the modulating power, the index copies of the valid
    anchors). At 512 px, batch 8 and 20 classes, checkpointing them took 186 MiB off the peak
    of the last local module and of BP (docs/detection.md, Memory). Checkpointed per image, the
    forward keeps none of it and the backward rebuilds one image's at a time, for an
    elementwise recomputation. Smaller logits than ``checkpoint_from_bytes`` take
    torchvision's call as it is, as does a forward without gradients.
    """
    logits = head_outputs["cls_logits"]
    if (logits.numel() * logits.element_size() < checkpoint_from_bytes or not torch.is_grad_enabled()
            or not any(t.requires_grad for t in head_outputs.values())):
        return net.compute_loss(targets, head_outputs, anchors)
    keys = list(head_outputs)

    def one_image(target: dict[str, Tensor], anchors_of_image: Tensor, *outputs: Tensor) -> dict[str, Tensor]:
        return net.compute_loss([target], dict(zip(keys, outputs)), [anchors_of_image])

    # split, not indexing: its backward gathers the images' gradients into one tensor, where
    # each slice's backward would write a zero-filled tensor of the whole batch's size.
    images_outputs = zip(*(head_outputs[k].split(1) for k in keys))
    per_image = [checkpoint(one_image, target, anchors_of_image, *outputs, use_reentrant=False)
                 for target, anchors_of_image, outputs in zip(targets, anchors, images_outputs)]
    return {name: torch.stack([losses[name] for losses in per_image]).mean() for name in per_image[0]}


class Detections(list):
    """torchvision's eval output (a list of ``{"boxes", "scores", "labels"}``) that can also
    give the loss of the same forward: ``losses(targets)``, or None when unavailable."""

    losses: Callable[[Targets], dict[str, Tensor]] | None = None


def _stem_conv_bn(body: nn.Module) -> ChunkedConvBN:
    """A ResNet's conv1-bn1-relu-maxpool. It writes the network's largest maps, so in a
    checkpointed module it runs in batch chunks (``fba.engine.chunked_bn``): at batch 8 and
    512 px its backward holds 544 MiB at once otherwise."""
    return ChunkedConvBN(body.conv1, body.bn1, nn.Sequential(body.relu, body.maxpool))


# ---- RetinaNet -----------------------------------------------------------------------------------
class RetinaNetStem(nn.Module):
    """torchvision's transform (normalise, resize in eval, pad to 32) + conv1-bn1-relu-maxpool.

    ``images``: ``(N, 3, H, W)`` in [0, 1] or a list of ``(3, H_i, W_i)`` ->
    ``(N, 64, H/4, W/4)``; records the image geometry in the taps.
    """

    def __init__(self, net: RetinaNet, taps: PyramidTaps) -> None:
        super().__init__()
        body = net.backbone.body
        self.transform = net.transform
        self.conv_bn = _stem_conv_bn(body)
        object.__setattr__(self, "taps", taps)

    def forward(self, images: Tensor | list[Tensor]) -> Tensor:
        original = [tuple(image.shape[-2:]) for image in images]
        batch, _ = self.transform(images)
        self.taps.begin(batch.tensors.shape[-2:], batch.image_sizes, original)
        return self.conv_bn(batch.tensors)


class RetinaNetOutputs(nn.Module):
    """Shared tail of the RetinaNet heads: anchors, then the loss (training) or the detections
    (eval), with the torchvision ``RetinaNet`` ``net``'s own methods."""

    taps: PyramidTaps

    def _finish(self, net: RetinaNet, features: list[Tensor]) -> DetectionTrainingOutput | Detections:
        head_outputs = net.head(features)
        anchors = net.anchor_generator(self.taps.image_list(features[0]), features)
        # Captured now: the taps belong to whichever forward ran last.
        image_sizes, original_sizes = list(self.taps.image_sizes), list(self.taps.original_sizes)

        def compute(targets: Targets) -> dict[str, Tensor]:
            targets = prepare_targets(targets, original_sizes, image_sizes, anchors[0].device,
                                      net.head.classification_head.num_classes)
            return retinanet_loss(net, targets, head_outputs, anchors)

        # The mode of the shared head, not of this wrapper: the plain model and the units' view
        # of it must agree whichever of the two was put in train or eval mode.
        if net.head.training:
            return DetectionTrainingOutput(head_outputs, compute)
        # RetinaNet.forward's own eval tail: split the outputs per level, decode, NMS, rescale.
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        num_anchors = head_outputs["cls_logits"].shape[1] // sum(per_level)
        per_level = [n * num_anchors for n in per_level]
        split = {key: list(value.split(per_level, dim=1)) for key, value in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = net.postprocess_detections(split, split_anchors, image_sizes)
        result = Detections(net.transform.postprocess(detections, image_sizes, original_sizes))
        result.losses = compute
        return result


class RetinaNetFPNHead(RetinaNetOutputs):
    """The main head: C5 (the last unit's output) + C3, C4 from the taps -> FPN P3-P7 ->
    RetinaNetHead. ``(N, C5, H/32, W/32)`` -> training output or detections.

    Registers the FPN and the RetinaNet head (its parameters); the plain model is referenced,
    not registered, so the backbone's parameters are not owned twice.
    """

    def __init__(self, net: RetinaNet, taps: PyramidTaps) -> None:
        super().__init__()
        self.fpn = net.backbone.fpn
        self.head = net.head
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "taps", taps)

    def forward(self, c5: Tensor) -> DetectionTrainingOutput | Detections:
        c3, c4 = self.taps.read()
        pyramid = self.fpn(OrderedDict([("0", c3), ("1", c4), ("2", c5)]))
        return self._finish(self.net, list(pyramid.values()))


class _SingleMap(nn.Identity):
    """The backbone of an FPN-less RetinaNet: the module's map itself (torchvision's RetinaNet
    wants a backbone with ``out_channels``)."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels


class SingleLevelRetinaNetHead(RetinaNetOutputs):
    """A light, FPN-less RetinaNet head on one map: ``(N, C, h, w)`` -> training output or
    detections, for auxiliary networks (``make_head``).

    It is a fresh torchvision ``RetinaNet`` whose backbone is the map itself: one level that
    carries every anchor size of the pyramid (5 base sizes x 3 octaves x 3 ratios = 45
    anchors per location), a ``RetinaNetHead`` of ``in_channels`` width (4 convs per branch,
    GroupNorm with up to 32 groups), torchvision's matcher, focal and box losses, and NMS.
    The FBA local FPN that reads the bank's multi-scale maps is built elsewhere (the task's
    FBA part); this is the plain "copy of the task's head" for one map.
    """

    def __init__(self, in_channels: int, num_classes: int, anchor_sizes: Sequence[float], taps: PyramidTaps,
                 box_loss: str = "l1") -> None:
        super().__init__()
        pyramid = anchor_generator(anchor_sizes)
        anchors = AnchorGenerator((tuple(s for level in pyramid.sizes for s in level),), (ASPECT_RATIOS,))
        head = RetinaNetHead(in_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, math.gcd(32, in_channels)))
        head.regression_head._loss_type = box_loss
        self.net = RetinaNet(_SingleMap(in_channels), num_classes, anchor_generator=anchors, head=head)
        object.__setattr__(self, "taps", taps)

    def forward(self, h: Tensor) -> DetectionTrainingOutput | Detections:
        return self._finish(self.net, [h])


# ---- YOLOv1 --------------------------------------------------------------------------------------
class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: ``(N, 3, H, W)`` in [0, 1] -> ImageNet-normalised.

    The statistics are non-persistent buffers: constants, not weights to save."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _as_batch(images: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(images, Tensor):
        return images
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) != 1:
        raise ValueError(f"YOLOv1 takes images of one size per batch (its grid covers the batch), got {sorted(sizes)}")
    return torch.stack(list(images))


class YOLOv1Head(nn.Module):
    """YOLOv1's detection head on one map: ``(N, C, h, w) -> (N, S, S, 5B + C_cls)``.

    Two 3x3 conv-GroupNorm-LeakyReLU(0.1) layers, an adaptive average pool to the S x S grid
    (identity when the map already is S x S), and a 1x1 conv predictor. Per cell and box b,
    channels ``5b..5b+4`` are (x, y, w, h, confidence) logits: x, y are the box centre's
    offset inside the cell and w, h its size as a fraction of the image, all through a
    sigmoid; the last ``num_classes`` channels are the cell's class logits (softmax).

    Args:
        in_channels: channels of the input map.
        num_classes: object classes (labels 0..num_classes-1; no background class).
        grid_size: S.
        num_boxes: B, boxes per cell.
        hidden_channels: width of the two convs (default ``min(in_channels, 512)``).
        lambda_coord, lambda_noobj: YOLOv1's loss weights (5 and 0.5).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: inference settings
            (torchvision's RetinaNet defaults: 0.05, 0.5, 300, 1000).
    """

    def __init__(self, in_channels: int, num_classes: int, grid_size: int, num_boxes: int = 2,
                 hidden_channels: int | None = None, lambda_coord: float = 5.0, lambda_noobj: float = 0.5,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 300,
                 topk_candidates: int = 1000) -> None:
        super().__init__()
        if grid_size < 1 or num_boxes < 1 or num_classes < 1:
            raise ValueError(f"YOLOv1 needs grid_size, num_boxes and num_classes >= 1, got {grid_size}, "
                             f"{num_boxes}, {num_classes}")
        hidden = hidden_channels or min(in_channels, 512)
        groups = math.gcd(32, hidden)
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.GroupNorm(groups, hidden), nn.LeakyReLU(0.1),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.GroupNorm(groups, hidden), nn.LeakyReLU(0.1))
        self.predictor = nn.Conv2d(hidden, 5 * num_boxes + num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)
        self.num_classes, self.grid_size, self.num_boxes = num_classes, grid_size, num_boxes
        self.lambda_coord, self.lambda_noobj = lambda_coord, lambda_noobj
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    def forward(self, h: Tensor) -> Tensor:
        z = self.convs(h)
        if z.shape[-2:] != (self.grid_size, self.grid_size):
            z = F.adaptive_avg_pool2d(z, self.grid_size)
        return self.predictor(z).permute(0, 2, 3, 1)

    def decode(self, grid: Tensor, image_size: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``grid`` ``(N, S, S, 5B + C)`` -> boxes ``(N, S, S, B, 4)`` xyxy pixels, confidences
        ``(N, S, S, B)`` and class probabilities ``(N, S, S, C)``."""
        return self._decode(grid, image_size)[:3]

    def _decode(self, grid: Tensor, image_size: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`decode` and the sigmoid box outputs ``(N, S, S, B, 5)`` it came from (the loss
        regresses those)."""
        S, B = self.grid_size, self.num_boxes
        height, width = image_size
        boxes = torch.sigmoid(grid[..., : 5 * B].float().unflatten(-1, (B, 5)))
        cols = torch.arange(S, device=grid.device, dtype=boxes.dtype).view(1, 1, S, 1)
        rows = torch.arange(S, device=grid.device, dtype=boxes.dtype).view(1, S, 1, 1)
        cx, cy = (cols + boxes[..., 0]) / S * width, (rows + boxes[..., 1]) / S * height
        w, h = boxes[..., 2] * width, boxes[..., 3] * height
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        return xyxy, boxes[..., 4], torch.softmax(grid[..., 5 * B:].float(), dim=-1), boxes

    def compute_loss(self, grid: Tensor, targets: Targets, image_size: Sequence[int]) -> dict[str, Tensor]:
        """YOLOv1's sum-squared loss, summed over cells and divided by the batch size.

        Each object belongs to the cell holding its centre (the largest object, when several
        share a cell); of that cell's B boxes the one with the highest IoU with it is
        *responsible*. With sigmoid outputs x, y (offsets in the cell), w, h (fractions of
        the image) and confidence c, and softmax class probabilities p:

        - ``bbox_regression``: lambda_coord * sum over responsible boxes of
          (x - x*)^2 + (y - y*)^2 + (sqrt w - sqrt w*)^2 + (sqrt h - sqrt h*)^2;
        - ``objectness``: sum over responsible boxes of (c - IoU)^2, the IoU of the
          predicted and true boxes (no gradient through the IoU);
        - ``no_object``: lambda_noobj * sum over every other box of c^2;
        - ``classification``: sum over cells with an object of sum over classes (p - 1[class])^2.
        """
        N, S, B = grid.shape[0], self.grid_size, self.num_boxes
        check_targets(targets, N, self.num_classes)
        height, width = image_size
        pred_xyxy, conf, probs, raw = self._decode(grid, image_size)
        zero = grid.new_zeros((), dtype=torch.float32)
        coord, obj, cls = zero, zero, zero
        responsible = torch.zeros_like(conf, dtype=torch.bool)
        for i, target in enumerate(targets):
            boxes = target["boxes"].to(grid.device, torch.float32)
            if boxes.numel() == 0:
                continue
            labels = target["labels"].to(grid.device)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            col = (cx / width * S).floor().long().clamp(0, S - 1)
            row = (cy / height * S).floor().long().clamp(0, S - 1)
            # One object per cell: the largest, so that a big object is not lost to a small one.
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            order = torch.argsort(area, descending=True, stable=True)
            _, inverse = torch.unique(row[order] * S + col[order], return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), len(order), device=grid.device, dtype=torch.long)
            first = first.scatter_reduce(0, inverse, torch.arange(len(order), device=grid.device), "amin")
            keep = order[first]
            boxes, labels, col, row, cx, cy = boxes[keep], labels[keep], col[keep], row[keep], cx[keep], cy[keep]

            M = len(keep)
            with torch.no_grad():  # the IoU picks the responsible box and is a target: no gradient
                pairwise = box_iou(pred_xyxy[i, row, col].reshape(-1, 4), boxes).view(M, B, M)
                ious = pairwise[torch.arange(M), :, torch.arange(M)]  # (M, B): box b of object m's cell vs m
            best = ious.argmax(dim=1)
            responsible[i, row, col, best] = True
            chosen = raw[i, row, col, best]  # (M, 5)
            target_xy = torch.stack([cx / width * S - col, cy / height * S - row], dim=1)
            target_wh = torch.stack([(boxes[:, 2] - boxes[:, 0]) / width, (boxes[:, 3] - boxes[:, 1]) / height], dim=1)
            coord = coord + ((chosen[:, :2] - target_xy) ** 2).sum()
            coord = coord + ((chosen[:, 2:4].sqrt() - target_wh.clamp(min=0).sqrt()) ** 2).sum()
            iou = ious.gather(1, best[:, None])[:, 0]
            obj = obj + ((chosen[:, 4] - iou) ** 2).sum()
            one_hot = F.one_hot(labels, self.num_classes).to(probs.dtype)
            cls = cls + ((probs[i, row, col] - one_hot) ** 2).sum()
        no_obj = (conf[~responsible] ** 2).sum()
        return {"bbox_regression": self.lambda_coord * coord / N, "objectness": obj / N,
                "no_object": self.lambda_noobj * no_obj / N, "classification": cls / N}

    @torch.no_grad()
    def postprocess(self, grid: Tensor, image_size: Sequence[int]) -> list[dict[str, Tensor]]:
        """Class-specific scores (confidence x class probability) above ``score_thresh``, the
        ``topk_candidates`` best, ``batched_nms`` per class, at most ``detections_per_img``."""
        xyxy, conf, probs = self.decode(grid, image_size)
        N, B, C = grid.shape[0], self.num_boxes, self.num_classes
        boxes = clip_boxes_to_image(xyxy.reshape(N, -1, 4), tuple(image_size))
        scores = (conf.unsqueeze(-1) * probs.unsqueeze(3)).reshape(N, -1)  # (N, S*S*B*C)
        out = []
        for i in range(N):
            keep = torch.where(scores[i] > self.score_thresh)[0]
            image_scores, top = scores[i, keep].topk(min(self.topk_candidates, len(keep)))
            keep = keep[top]
            image_boxes, image_labels = boxes[i, keep // C], keep % C
            kept = batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": image_boxes[kept], "scores": image_scores[kept], "labels": image_labels[kept]})
        return out


class YOLOv1(nn.Module):
    """ResNet-based YOLOv1: ``(N, 3, H, W)`` in [0, 1] (or a list of equal-sized images) ->
    detections (eval) or, with ``targets``, the loss dict (training), like torchvision's
    detection models.

    Attributes:
        normalize: the ImageNet normalisation.
        backbone: the ResNet's conv1..layer4 (torchvision's names; no avgpool, no fc).
        head: a :class:`YOLOv1Head`.
    """

    def __init__(self, backbone: tv_resnet.ResNet, head: YOLOv1Head) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.backbone = IntermediateLayerGetter(backbone, {"layer4": "0"})
        self.head = head

    def forward(self, images: Tensor | list[Tensor], targets: Targets | None = None):
        x = _as_batch(images)
        grid = self.head(self.backbone(self.normalize(x))["0"])
        if self.training:
            if targets is None:
                raise ValueError("YOLOv1 in training mode needs targets")
            return self.head.compute_loss(grid, targets, x.shape[-2:])
        return self.head.postprocess(grid, x.shape[-2:])


class YOLOv1Stem(nn.Module):
    """Normalisation + conv1-bn1-relu-maxpool: ``(N, 3, H, W) -> (N, 64, H/4, W/4)``; records
    the image size in the taps."""

    def __init__(self, net: YOLOv1, taps: PyramidTaps) -> None:
        super().__init__()
        body = net.backbone
        self.normalize = net.normalize
        self.conv_bn = _stem_conv_bn(body)
        object.__setattr__(self, "taps", taps)

    def forward(self, images: Tensor | list[Tensor]) -> Tensor:
        x = _as_batch(images)
        size = tuple(x.shape[-2:])
        self.taps.begin(size, [size] * x.shape[0], [size] * x.shape[0])
        return self.conv_bn(self.normalize(x))


class YOLOv1HeadUnit(nn.Module):
    """A :class:`YOLOv1Head` on a unit's map, with the image size from the taps: ``(N, C, h, w)``
    -> training output or detections."""

    def __init__(self, head: YOLOv1Head, taps: PyramidTaps) -> None:
        super().__init__()
        self.head = head
        object.__setattr__(self, "taps", taps)

    def forward(self, h: Tensor) -> DetectionTrainingOutput | Detections:
        if self.taps.batch_shape is None:
            raise RuntimeError("the head ran before the stem recorded the image size")
        grid, size = self.head(h), self.taps.batch_shape

        def compute(targets: Targets) -> dict[str, Tensor]:
            return self.head.compute_loss(grid, targets, size)

        if self.head.training:  # the shared head's mode (see RetinaNetOutputs._finish)
            return DetectionTrainingOutput({"grid": grid}, compute)
        result = Detections(self.head.postprocess(grid, size))
        result.losses = compute
        return result


# ---- units ---------------------------------------------------------------------------------------
def _block_channels(block: nn.Module) -> int:
    return block.bn3.num_features if isinstance(block, tv_resnet.Bottleneck) else block.bn2.num_features


def _resnet_blocks(body: nn.Module, prefix: str) -> tuple[list[nn.Module], list[UnitSpec], list[type]]:
    """Every residual block of ``body.layer1..4``, its spec (named ``prefix + "layerS.i"``),
    and each stage's block type."""
    layers = [getattr(body, f"layer{stage}") for stage in range(1, 5)]
    return stage_blocks(layers, 4, _block_channels, prefix)  # the stem downsamples by 4


def _stage_ends(specs: Sequence[UnitSpec], stages: Sequence[int]) -> list[int]:
    """Unit indices of the last unit of each of ``stages``."""
    return [max(i for i, spec in enumerate(specs) if spec.stage == stage) for stage in stages]


def _stage_block_maker(block_types: list[type]) -> Callable[..., nn.Module]:
    def stage_block(stage: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        """A fresh block of ``stage``'s type (the stem, stage 0, counts as stage 1's)."""
        return _resnet_block(block_types[max(1, stage) - 1], in_channels, out_channels, stride)

    return stage_block


def _check_rgb(in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"detection models take RGB images (in_channels=3), got in_channels={in_channels}")


def retinanet_unit_model(depth: int, num_classes: int, image_size: int,
                         anchor_sizes: Sequence[float] | None = None, fpn_channels: int = FPN_CHANNELS,
                         box_loss: str = "l1") -> UnitModel:
    """``retinanet_resnet<depth>`` as units + head; ``plain`` is :func:`torchvision_retinanet`'s object.

    Args:
        depth: ResNet depth, one of 18, 34, 50, 101, 152.
        num_classes: object classes.
        image_size: the side of the square training images (sets the transform and the
            default anchors).
        anchor_sizes: base anchor size of each level P3..P7 (default
            :func:`default_anchor_sizes`).
        fpn_channels: width of the FPN and of the RetinaNet head (torchvision's 256).
        box_loss: the box regression loss, one of :data:`BOX_LOSSES`; the local heads that
            :func:`~fba.tasks.detection.local.build_fba_slms` and the DGL builder make copy it.
    """
    anchor_sizes = tuple(anchor_sizes or default_anchor_sizes(image_size))
    net = torchvision_retinanet(depth, num_classes, image_size, anchor_sizes, fpn_channels, box_loss)
    # Training images come at the model's size, and a resize here would not reach the
    # targets (units pass images only): the transform normalises and pads, and resizes in
    # eval only, as torchvision's own reference scripts do with this switch.
    net.transform._skip_resize = True
    blocks, block_specs, block_types = _resnet_blocks(net.backbone.body, "backbone.body.")
    specs = [UnitSpec("backbone.body.conv1", 64, 4, 0), *block_specs]
    taps = PyramidTaps(_stage_ends(specs, FPN_LAYERS[:-1]))  # C3 and C4; C5 is the head's input
    units: list[nn.Module] = [RetinaNetStem(net, taps), *blocks]
    for key in taps.keys:
        units[key] = TappedBlock(units[key], taps, key)
    return UnitModel(
        plain=net,
        units=units,
        specs=specs,
        head=RetinaNetFPNHead(net, taps),
        make_stage_block=_stage_block_maker(block_types),
        make_head=lambda channels: SingleLevelRetinaNetHead(channels, num_classes, anchor_sizes, taps, box_loss),
        set_partition=taps.set_partition,
    )


def default_grid_size(image_size: int) -> int:
    """YOLO's S for a square input: one cell per C5 pixel (stride 32), so 224 px gives the
    classic S=7, 448 px gives 14 and 128 px gives 4."""
    return max(1, image_size // 32)


def yolov1_unit_model(depth: int, num_classes: int, image_size: int, grid_size: int | None = None,
                      num_boxes: int = 2) -> UnitModel:
    """``yolov1_resnet<depth>`` as units + head; ``plain`` is a :class:`YOLOv1`.

    Args:
        depth: ResNet depth, one of 18, 34, 50, 101, 152.
        num_classes: object classes.
        image_size: the side of the square input (sets the default grid).
        grid_size: S (default :func:`default_grid_size`); other sizes pool C5 to S x S.
        num_boxes: B, boxes per cell.
    """
    c5_channels(depth)  # validates the depth
    backbone = getattr(tv_resnet, f"resnet{depth}")(weights=None, norm_layer=nn.BatchNorm2d)
    head = YOLOv1Head(c5_channels(depth), num_classes, grid_size or default_grid_size(image_size), num_boxes)
    net = YOLOv1(backbone, head)
    taps = PyramidTaps()  # no maps: YOLOv1 reads C5 only; the taps carry the image size
    blocks, specs, block_types = _resnet_blocks(net.backbone, "backbone.")
    settings = dict(grid_size=head.grid_size, num_boxes=num_boxes)
    return UnitModel(
        plain=net,
        units=[YOLOv1Stem(net, taps), *blocks],
        specs=[UnitSpec("backbone.conv1", 64, 4, 0), *specs],
        head=YOLOv1HeadUnit(head, taps),
        make_stage_block=_stage_block_maker(block_types),
        make_head=lambda channels: YOLOv1HeadUnit(YOLOv1Head(channels, num_classes, **settings), taps),
        set_partition=taps.set_partition,
    )


def _retinanet(depth: int) -> Callable[..., UnitModel]:
    def build(num_classes: int = 20, in_channels: int = 3, image_size: int = 512,
              anchor_sizes: Sequence[float] | None = None, fpn_channels: int = FPN_CHANNELS,
              box_loss: str = "l1") -> UnitModel:
        _check_rgb(in_channels)
        return retinanet_unit_model(depth, num_classes, image_size, anchor_sizes, fpn_channels, box_loss)

    build.__doc__ = f"RetinaNet on ResNet-{depth} + FPN (P3-P7), torchvision's parts, from scratch."
    return build


def _yolov1(depth: int) -> Callable[..., UnitModel]:
    def build(num_classes: int = 20, in_channels: int = 3, image_size: int = 512, grid_size: int | None = None,
              num_boxes: int = 2) -> UnitModel:
        _check_rgb(in_channels)
        return yolov1_unit_model(depth, num_classes, image_size, grid_size, num_boxes)

    build.__doc__ = f"YOLOv1 on ResNet-{depth}: S x S grid, B boxes per cell, sum-squared loss, from scratch."
    return build


for _depth in DEPTHS:
    MODELS.register(f"retinanet_resnet{_depth}")(_retinanet(_depth))
    MODELS.register(f"yolov1_resnet{_depth}")(_yolov1(_depth))
