"""Auxiliary networks and the feature bank of local learning for detection.

- :class:`MultiScaleMapBank` is the detection bank (paper, "Instantiation in Object
  Detection"): the whole output maps, detached, of the earlier modules of the current step
  at the pyramid's finer scales (stride 8, 16, ...) and, with ``fba.bank.source=lookahead``,
  the coarser C4/C5 of a no-grad forward of the same batch, each kept only until the last
  SLM that reads it has run.
- :class:`LocalFPN` is the light pyramid an auxiliary network builds on a module's map:
  1x1 laterals, a nearest top-down pathway and 3x3 output convs (torchvision's FPN, no
  normalisation, narrow), levels from P3 (stride 8) up to P7 (stride 128). Its finer levels
  come from the bank (FBA) or are made from the module's own map by upsampling convs
  (DGL); its coarser levels come from lookahead maps or are made by stride-2 convs (as
  P6/P7 are).
- :class:`DetectionSLM` is FBA's Simple Local Module for RetinaNet: a fresh stage-tail
  block, a :class:`LocalFPN` fed by the bank, a :class:`LocalRetinaNetHead`.
  :class:`YOLOSLM` is the one for YOLOv1 (single scale): the finer maps pooled to the
  module's grid and added, then a YOLO head.
- :class:`MapPredictor` is ``fba.bank.usage=target``: an SLM's levels predict the lookahead
  C4/C5 maps instead of reading them.
- :class:`FPNAux` is DGL's FPN-style auxiliary network (paper Table 3): the module's map
  only, a pyramid by upsampling and stride-2 convs, a light RetinaNet head; for YOLOv1 a
  fresh YOLO head.

The ``build_*`` functions at the end are what this task offers each method (registered in
``plugin.py``). Their settings (``det.local_channels``, ``det.local_head_convs``,
``det.local_coarser``) reach them on the model (``UnitModel.local_settings``, set by the
plugin's ``build_model``), so the engine's build context carries no task option.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from fba.engine.bank import StepOnlyBank
from fba.tasks.detection.models import (
    DetectionTrainingOutput, Detections, PyramidTaps, RetinaNetFPNHead, RetinaNetOutputs, _SingleMap,
)
from fba.tasks.detection.plugin import LOCAL_KEYS, LOOKAHEAD_FUSIONS, DetectionPlugin

if TYPE_CHECKING:
    from fba.engine.units import UnitModel
    from fba.methods.base import BuildContext
    from fba.methods.fba import FBA

#: strides of the pyramid levels P3..P7 (the main RetinaNet's)
PYRAMID_STRIDES = (8, 16, 32, 64, 128)
#: defaults of the SLM settings (``det.local_*``), see :func:`local_settings`
DEFAULT_LOCAL = {key: DetectionPlugin.config_defaults[key] for key in LOCAL_KEYS}


def local_settings(model: "UnitModel", reduction: int = 1) -> dict[str, Any]:
    """The auxiliary networks' settings: ``channels`` (local FPN and head width: the
    ``det.local_channels`` value, or 64 divided by ``reduction``, at least 16),
    ``head_convs`` (3x3 convs per head branch, 1..4), ``coarser`` (make P6/P7-like levels),
    ``finer`` (an SLM without bank maps makes the finer levels by upsampling),
    ``min_stride`` (None, or the stride an SLM brings a finer module's map to first),
    ``zero_init`` (an SLM's block starts as its shortcut) and ``lookahead_fusion`` (how
    coarser lookahead maps enter the local FPN)."""
    given = {**DEFAULT_LOCAL, **getattr(model, "local_settings", {})}
    channels = given["local_channels"] or max(16, 64 // reduction)
    min_stride = given["local_min_stride"]
    return {"channels": int(channels), "head_convs": int(given["local_head_convs"]),
            "coarser": bool(given["local_coarser"]), "finer": bool(given["local_finer"]),
            "min_stride": int(min_stride) if min_stride else None,
            "zero_init": bool(given["local_zero_init"]), "lookahead_fusion": str(given["lookahead_fusion"])}


def stride_reduction(channels: int, stride: int, min_stride: int | None) -> tuple[nn.Module, int]:
    """Stride-2 3x3 convs (ReLU between) that bring a map of ``stride`` to ``min_stride``,
    and the stride after them: the identity and ``stride`` when it is not finer.

    Run before an SLM's block, they make it work on 4x fewer pixels per halving: on the stem's
    and layer1's stride-4 maps that block's activations are the largest part of module 0's
    training peak (docs/detection.md, Memory).
    """
    if not min_stride or stride >= min_stride:
        return nn.Identity(), stride
    halvings = int(round(math.log2(min_stride / stride)))
    if stride * 2 ** halvings != min_stride:
        raise ValueError(f"det.local_min_stride must be the module's stride times a power of two, got {min_stride} "
                         f"for stride {stride}")
    layers: list[nn.Module] = []
    for i in range(halvings):
        layers += [nn.ReLU(inplace=False)] if i else []
        layers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
    return nn.Sequential(*layers), min_stride


def zero_init_residual(block: nn.Module) -> None:
    """Zero the scale of a ResNet block's last BatchNorm (torchvision's ``zero_init_residual``):
    the block then starts as its shortcut, and its residual branch grows only as far as the
    SLM's loss asks it to."""
    last = block.bn3 if hasattr(block, "bn3") else block.bn2
    nn.init.zeros_(last.weight)


# --------------------------------------------------------------------------- the bank
def finer_sources(strides: Sequence[int], K: int) -> list[list[int]]:
    """For each module k < K-1, the earlier modules whose maps its SLM reads, fine to coarse:
    for every pyramid stride (8, 16, ...) below module k's own, the latest earlier module
    whose output has exactly that stride."""
    out = []
    for k in range(K - 1):
        latest: dict[int, int] = {}
        for j in range(k):
            if strides[j] in PYRAMID_STRIDES and strides[j] < strides[k]:
                latest[strides[j]] = j
        out.append([latest[s] for s in sorted(latest)])
    return out


def coarser_sources(strides: Sequence[int], K: int, min_stride: int | None = None) -> list[list[int]]:
    """For each module k < K-1, the later modules whose lookahead maps its SLM reads, fine to
    coarse: for every backbone pyramid stride (8, 16, 32: C3, C4, C5) above module k's own
    level, the last module whose output has that stride, i.e. the map the main FPN reads at
    that scale. The own level is the module's stride, at least 8 (P3) and at least
    ``min_stride`` (``det.local_min_stride``)."""
    last: dict[int, int] = {}
    for j, stride in enumerate(strides):
        if stride in PYRAMID_STRIDES[:3]:
            last[stride] = j
    floor = max(PYRAMID_STRIDES[0], min_stride or 0)
    return [[last[s] for s in sorted(last) if s > max(strides[k], floor)] for k in range(K - 1)]


class MultiScaleMapBank(StepOnlyBank):
    """The bank of detection: whole output maps of other modules, detached, this step only.

    - **In-pass, finer scales** (``sources``): module j's map from this step's local pass is
      stored (``h.detach()``, a reference: no copy, no compute) only if a later SLM reads it.
    - **Lookahead, coarser scales** (``ahead``): the engine's no-grad forward of the whole
      backbone at the start of the step (``needs_lookahead``) gives every module's map for
      this batch before any module learns from it; the maps of the modules listed are kept.

    Each map is dropped right after the last SLM that reads it, so at most one map per pyramid
    scale and source is held at a time. Implements the engine's bank interface.

    Args:
        sources: for each module k < K-1, the earlier modules whose in-pass maps SLM k reads
            (:func:`finer_sources`).
        ahead: for each module k < K-1, the later modules whose lookahead maps SLM k reads
            (:func:`coarser_sources`); None for none.
    """

    def __init__(self, sources: Sequence[Sequence[int]], ahead: Sequence[Sequence[int]] | None = None) -> None:
        self.sources = [list(s) for s in sources]
        self.ahead = [list(s) for s in ahead] if ahead is not None else [[] for _ in self.sources]
        if len(self.ahead) != len(self.sources):
            raise ValueError("one list of lookahead sources per SLM")
        self.last_reader = {j: k for k, js in enumerate(self.sources) for j in js}
        self.last_ahead_reader = {j: k for k, js in enumerate(self.ahead) for j in js}
        self.source = "lookahead" if self.last_ahead_reader else "inpass"
        self._maps: dict[int, Tensor] = {}
        self._ahead: dict[int, Tensor] = {}

    @property
    def needs_lookahead(self) -> bool:
        return bool(self.last_ahead_reader)

    def begin_step(self, indices: Tensor | None) -> None:
        self._maps.clear()
        self._ahead.clear()

    def write(self, k: int, h: Tensor) -> None:
        if k in self.last_reader:
            self._maps[k] = h.detach()

    def write_lookahead(self, k: int, h: Tensor) -> None:
        if k in self.last_ahead_reader:
            self._ahead[k] = h.detach()

    def read(self, k: int, device: Any) -> tuple[list[Tensor] | None, None]:
        """Module k's bank maps ``[(N, C_j, H_j, W_j), ...]`` fine to coarse: the in-pass finer
        ones, then the lookahead coarser ones (None if none)."""
        if k >= len(self.sources) or not (self.sources[k] or self.ahead[k]):
            return None, None
        missing = [j for j in self.sources[k] if j not in self._maps]
        missing_ahead = [j for j in self.ahead[k] if j not in self._ahead]
        if missing or missing_ahead:
            raise RuntimeError(f"the detection bank has no map of modules {missing + missing_ahead} for module {k} "
                               "in this step")
        maps = [self._maps[j].to(device) for j in self.sources[k]] + [self._ahead[j].to(device) for j in self.ahead[k]]
        for j in self.sources[k]:
            if self.last_reader[j] == k:
                del self._maps[j]
        for j in self.ahead[k]:
            if self.last_ahead_reader[j] == k:
                del self._ahead[j]
        return maps, None

    def end_step(self) -> None:
        self._maps.clear()
        self._ahead.clear()

    def step_features(self) -> dict[int, Tensor]:
        """The in-pass maps still held (for a pipeline's next stage)."""
        return dict(self._maps)

    def load_step_features(self, features: dict[int, Tensor]) -> None:
        self._maps.update({j: t.detach() for j, t in features.items()})

    def tensors(self) -> list[Tensor]:
        return [*self._maps.values(), *self._ahead.values()]


# --------------------------------------------------------------------------- the local FPN
class LocalFPN(nn.Module):
    """A narrow FPN on one module's map: ``forward(own, bank=()) -> [levels]``, fine to coarse.

    Levels and their strides (``self.strides``):

    - finer levels (strides 8 .. own/2): from ``finer_channels`` bank maps through 1x1
      laterals (FBA), or, with ``make_finer``, made from the module's map by nearest 2x
      upsampling and a 3x3 conv each (DGL);
    - the module's own level at ``max(own_stride, 8)`` (a map finer than P3, the stem's or
      layer1's, is brought to stride 8 by stride-2 3x3 convs);
    - coarser levels from ``ahead_channels`` lookahead bank maps (FBA with
      ``fba.bank.source=lookahead``: C4, C5 of this batch, as the main FPN reads them), each
      through a 1x1 lateral. ``ahead_fusion="replace"``: that lateral is the level, as in the
      main FPN, so the module's map reaches only its own and finer levels. ``"add"``: each
      such level also gets a stride-2 3x3 conv of the level below, so the module's map
      reaches every level and the lookahead map adds its context;
    - with ``coarser``, the levels above those, up to stride 128, by stride-2 3x3 convs from
      the coarsest output level, ReLU between them (torchvision's ``LastLevelP6P7``).

    Laterals are merged top-down (nearest upsampling + add) and each gets a 3x3 output conv.
    No normalisation (torchvision's FPN has none). ``forward``'s ``bank`` is the bank's maps,
    fine to coarse: the finer ones, then the lookahead ones.
    """

    def __init__(self, own_channels: int, own_stride: int, channels: int, finer_channels: Sequence[int] = (),
                 finer_strides: Sequence[int] = (), make_finer: bool = False, coarser: bool = True,
                 ahead_channels: Sequence[int] = (), ahead_strides: Sequence[int] = (),
                 ahead_fusion: str = "replace") -> None:
        super().__init__()
        top = max(own_stride, PYRAMID_STRIDES[0])
        down = int(round(math.log2(top / own_stride)))
        if own_stride * 2 ** down != top:
            raise ValueError(f"the local FPN needs a power-of-two stride, got {own_stride}")
        if down:
            layers: list[nn.Module] = []
            for i in range(down):
                layers += [nn.Conv2d(own_channels if i == 0 else channels, channels, 3, stride=2, padding=1)]
                if i < down - 1:
                    layers.append(nn.ReLU(inplace=True))
            self.own_lateral = nn.Sequential(*layers)
        else:
            self.own_lateral = nn.Conv2d(own_channels, channels, 1)
        if make_finer and finer_channels:
            raise ValueError("the local FPN takes finer maps from the bank or makes them, not both")
        self.make_finer = make_finer
        if make_finer:
            finer_strides = [s for s in PYRAMID_STRIDES if s < top]
            self.upsamplers = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in finer_strides)
            self.finer_laterals = nn.ModuleList()
        else:
            if len(finer_channels) != len(finer_strides):
                raise ValueError("one stride per finer map")
            self.upsamplers = nn.ModuleList()
            self.finer_laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in finer_channels)
        if len(ahead_channels) != len(ahead_strides):
            raise ValueError("one stride per lookahead map")
        if make_finer and ahead_channels:
            raise ValueError("the local FPN makes its finer levels only without lookahead maps")
        if ahead_fusion not in LOOKAHEAD_FUSIONS:
            raise ValueError(f"det.lookahead_fusion must be one of {LOOKAHEAD_FUSIONS}, got {ahead_fusion!r}")
        expected = [top * 2 ** (i + 1) for i in range(len(ahead_strides))]
        if list(ahead_strides) != expected:
            raise ValueError(f"lookahead maps must have the strides {expected} above the own level, "
                             f"got {list(ahead_strides)}")
        self.ahead_laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in ahead_channels)
        self.ahead_downs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1)
                                         for _ in ahead_channels) if ahead_fusion == "add" else nn.ModuleList()
        self.output_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1)
                                          for _ in range(len(finer_strides) + 1 + len(ahead_strides)))
        highest = max([top, *ahead_strides])
        coarse_strides = [s for s in PYRAMID_STRIDES if s > highest] if coarser else []
        self.coarse_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1)
                                          for _ in coarse_strides)
        self.strides = [*finer_strides, top, *ahead_strides, *coarse_strides]
        for m in self.modules():  # torchvision's FPN init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, own: Tensor, bank: Sequence[Tensor] = ()) -> list[Tensor]:
        top = self.own_lateral(own)
        wanted = len(self.finer_laterals) + len(self.ahead_laterals)
        if len(bank) != wanted:
            raise ValueError(f"the local FPN was built for {wanted} bank maps, got {len(bank)}")
        finer, ahead = bank[:len(self.finer_laterals)], bank[len(self.finer_laterals):]
        if self.make_finer:
            laterals, x = [top], top
            for conv in self.upsamplers:
                x = F.relu(conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
                laterals.insert(0, x)
        else:
            laterals = [lateral(f) for lateral, f in zip(self.finer_laterals, finer)] + [top]
        x = top
        for i, (lateral, f) in enumerate(zip(self.ahead_laterals, ahead)):
            level = lateral(f)
            if self.ahead_downs:
                x = self.ahead_downs[i](F.relu(x) if i else x)
                level = level + x
            laterals.append(level)
        if not self.make_finer:
            for i in range(len(laterals) - 2, -1, -1):
                laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        levels = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        x = levels[-1]
        for i, conv in enumerate(self.coarse_convs):
            x = conv(F.relu(x) if i else x)
            levels.append(x)
        return levels


# --------------------------------------------------------------------------- heads
class LocalRetinaNetHead(RetinaNetOutputs):
    """A RetinaNet head on the local FPN's levels: ``[levels] ->`` training output or detections.

    A torchvision ``RetinaNet`` (matcher, focal and box losses, box coder, NMS) whose anchors
    are the main model's anchors of the levels the local FPN makes (by stride: 8 -> P3's,
    ..., 128 -> P7's), and whose head is either a fresh ``RetinaNetHead`` of the local width
    with ``num_convs`` 3x3 convs per branch (torchvision's has 4 and no option: the extra
    ones are dropped), GroupNorm, or the main model's head itself (``shared``).
    """

    def __init__(self, main: RetinaNet, strides: Sequence[int], channels: int, taps: PyramidTaps,
                 num_convs: int = 1, shared: bool = False) -> None:
        super().__init__()
        levels = [PYRAMID_STRIDES.index(s) for s in strides]
        gen = main.anchor_generator
        anchors = AnchorGenerator(tuple(gen.sizes[i] for i in levels), tuple(gen.aspect_ratios[i] for i in levels))
        if shared:
            head = main.head
        else:
            head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], main.head.classification_head.num_classes,
                                 norm_layer=partial(nn.GroupNorm, math.gcd(32, channels)))
            if not 1 <= num_convs <= 4:
                raise ValueError(f"det.local_head_convs must be 1..4, got {num_convs}")
            head.classification_head.conv = head.classification_head.conv[:num_convs]
            head.regression_head.conv = head.regression_head.conv[:num_convs]
            head.regression_head._loss_type = main.head.regression_head._loss_type  # the task's box loss
        self.net = RetinaNet(_SingleMap(channels), main.head.classification_head.num_classes,
                             anchor_generator=anchors, head=head)
        object.__setattr__(self, "taps", taps)

    def forward(self, levels: list[Tensor]) -> DetectionTrainingOutput | Detections:
        return self._finish(self.net, levels)


def _is_retinanet(model: "UnitModel") -> bool:
    return isinstance(model.head, RetinaNetFPNHead)


# --------------------------------------------------------------------------- FBA's SLMs
class MapPredictor(nn.Module):
    """``fba.bank.usage=target`` for detection: ``[maps] -> [predicted deep maps]``, one 1x1
    conv per target, each reading the map given for it (the local FPN level nearest below the
    target's stride, or the SLM's block output for YOLOv1). FBA's loss pools a prediction to
    its target's size and pulls it towards the target map, cosine per location."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], sources: Sequence[int]) -> None:
        super().__init__()
        if not len(in_channels) == len(out_channels) == len(sources):
            raise ValueError("one input width, output width and source per target map")
        self.sources = list(sources)
        self.projections = nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in zip(in_channels, out_channels))

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [proj(maps[i]) for proj, i in zip(self.projections, self.sources)]


def predictor_sources(level_strides: Sequence[int], target_strides: Sequence[int]) -> list[int]:
    """For each target stride, the index of the level that predicts it: the level of that
    stride, else the coarsest level finer than it, else level 0."""
    out = []
    for target in target_strides:
        below = [i for i, s in enumerate(level_strides) if s <= target]
        out.append(max(below, key=lambda i: level_strides[i]) if below else 0)
    return out


class DetectionSLM(nn.Module):
    """FBA's SLM for RetinaNet: ``forward(h, bank=None) -> (head output, predicted maps or None)``.

    ``head([adapter(l) for l in fpn(block(reduce(h)), bank)])``: a fresh stage-tail block
    (narrowed by ``fba.reduction``), the local FPN fed by the bank's maps, a RetinaNet
    head; ``adapter`` (1x1, shared across levels) widens the levels to a shared main head's
    width; ``reduce`` (:func:`stride_reduction`, default the identity) coarsens a fine map first.
    With a ``predictor`` (``fba.bank.usage=target``) the local FPN's levels also predict the
    deeper modules' maps: the second output, ``[(N, C_j, H, W), ...]``.
    """

    def __init__(self, block: nn.Module, fpn: LocalFPN, head: nn.Module, adapter: nn.Module | None = None,
                 reduce: nn.Module | None = None, predictor: MapPredictor | None = None) -> None:
        super().__init__()
        self.reduce = reduce or nn.Identity()
        self.block = block
        self.fpn = fpn
        self.adapter = adapter
        self.head = head
        self.predictor = predictor

    def forward(self, h: Tensor, bank: Sequence[Tensor] | None = None) -> tuple[Any, list[Tensor] | None]:
        levels = self.fpn(self.block(self.reduce(h)), bank or ())
        predicted = self.predictor(levels) if self.predictor is not None else None
        if self.adapter is not None:
            levels = [self.adapter(level) for level in levels]
        return self.head(levels), predicted


class YOLOSLM(nn.Module):
    """FBA's SLM for YOLOv1 (one scale): ``forward(h, bank=None) -> (head output, None)``.

    ``head(adapter(block(reduce(h)) + sum_j proj_j(resize(bank_j to the block's map))))``: a finer
    bank map is average-pooled to the block's map, a coarser (lookahead) one upsampled (nearest).
    """

    def __init__(self, block: nn.Module, head: nn.Module, bank_channels: Sequence[int], channels: int,
                 adapter: nn.Module | None = None, reduce: nn.Module | None = None,
                 predictor: MapPredictor | None = None) -> None:
        super().__init__()
        self.reduce = reduce or nn.Identity()
        self.block = block
        self.projections = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in bank_channels)
        self.adapter = adapter
        self.head = head
        self.predictor = predictor

    def forward(self, h: Tensor, bank: Sequence[Tensor] | None = None) -> tuple[Any, list[Tensor] | None]:
        z = self.block(self.reduce(h))
        for proj, f in zip(self.projections, bank or ()):
            if f.shape[-1] >= z.shape[-1]:
                f = F.adaptive_avg_pool2d(f, z.shape[-2:])
            else:
                f = F.interpolate(f, size=z.shape[-2:], mode="nearest")
            z = z + proj(f)
        predicted = self.predictor([z]) if self.predictor is not None else None
        if self.adapter is not None:
            z = self.adapter(z)
        return self.head(z), predicted


class FPNAux(nn.Module):
    """DGL's FPN-style auxiliary network for RetinaNet: ``h -> head(fpn(h))``, no bank:
    finer levels by upsampling convs, coarser by stride-2 convs, a light RetinaNet head."""

    def __init__(self, fpn: LocalFPN, head: nn.Module) -> None:
        super().__init__()
        self.fpn = fpn
        self.head = head

    def forward(self, h: Tensor) -> Any:
        return self.head(self.fpn(h))


# --------------------------------------------------------------------------- offered to methods
def _module_strides(ctx: "BuildContext") -> list[int]:
    return [ctx.last_spec(k).downsample for k in range(ctx.K)]


def _check_bank(method: "FBA") -> None:
    if method.bank_source not in ("none", "inpass", "lookahead"):
        raise ValueError("the detection bank is whole maps of the current step: use fba.bank.source=inpass, "
                         "lookahead or none")
    if method.bank_usage == "target" and method.bank_source not in ("none", "lookahead"):
        raise ValueError("fba.bank.usage=target pulls an SLM towards the deeper maps of this batch: use it with "
                         "fba.bank.source=lookahead")


def _is_target(method: "FBA") -> bool:
    return method.bank_source == "lookahead" and method.bank_usage == "target"


def bank_sources(method: "FBA", ctx: "BuildContext") -> tuple[list[list[int]], list[list[int]]]:
    """Per SLM, the modules whose maps it reads: in-pass finer ones (``inpass`` and
    ``lookahead`` as input) and lookahead coarser ones (``lookahead``, as input or as
    targets)."""
    _check_bank(method)
    strides, none = _module_strides(ctx), [[] for _ in range(ctx.K - 1)]
    if method.bank_source == "none":
        return none, none
    if _is_target(method):
        return none, coarser_sources(strides, ctx.K, local_settings(ctx.model)["min_stride"])
    finer = finer_sources(strides, ctx.K)
    if method.bank_source == "inpass":
        return finer, none
    return finer, coarser_sources(strides, ctx.K, local_settings(ctx.model)["min_stride"])


def build_fba_slms(method: "FBA", ctx: "BuildContext") -> list[nn.Module]:
    """FBA's K-1 SLMs for detection: stage-tail block, local FPN on the bank's maps, head.

    Module k's SLM maps ``(N, C_k, H_k, W_k)`` and its maps from the bank (finer in-pass ones,
    then coarser lookahead ones) to the head's training output (``DetectionTrainingOutput``)
    or, in eval, detections. With ``fba.bank.usage=target`` the lookahead maps are not fed
    in: a :class:`MapPredictor` on the SLM's maps predicts them instead.

    Raises:
        ValueError: a bank other than in-pass or lookahead maps, or a target from in-pass maps.
    """
    model = ctx.model
    settings = local_settings(model, method.reduction)
    strides = _module_strides(ctx)
    sources, ahead = bank_sources(method, ctx)
    taps = model.head.taps
    retina = _is_retinanet(model)
    nets: list[nn.Module] = []
    for k in range(ctx.K - 1):
        spec = ctx.last_spec(k)
        channels = max(1, spec.out_channels // method.reduction)
        if spec.out_channels % 4 == 0 and channels % 4:  # a Bottleneck's width is a multiple of 4
            channels = max(4, channels // 4 * 4)
        block = model.make_stage_block(max(1, spec.stage), spec.out_channels, channels)
        if settings["zero_init"]:
            zero_init_residual(block)
        reduce, stride = stride_reduction(spec.out_channels, spec.downsample, settings["min_stride"])
        finer_channels = [ctx.module_channels[j] for j in sources[k]]
        ahead_channels, ahead_strides = [ctx.module_channels[j] for j in ahead[k]], [strides[j] for j in ahead[k]]
        target_channels, target_strides = [], []
        if _is_target(method):  # the lookahead maps are predicted, not read
            target_channels, target_strides, ahead_channels, ahead_strides = ahead_channels, ahead_strides, [], []
        if retina:
            width = settings["channels"]
            # Upsampled finer levels only where the bank gives the SLM nothing: bank maps are the
            # finer levels themselves, and the local FPN takes one or the other.
            make_finer = settings["finer"] and not (finer_channels or ahead_channels)
            fpn = LocalFPN(channels, stride, width, finer_channels, [strides[j] for j in sources[k]], make_finer,
                           coarser=settings["coarser"] or method.share_head, ahead_channels=ahead_channels,
                           ahead_strides=ahead_strides, ahead_fusion=settings["lookahead_fusion"])
            main = model.plain
            adapter = nn.Conv2d(width, main.backbone.out_channels, 1) if method.share_head else None
            head = LocalRetinaNetHead(main, fpn.strides, width, taps, settings["head_convs"], shared=method.share_head)
            predictor = MapPredictor([width] * len(target_channels), target_channels,
                                     predictor_sources(fpn.strides, target_strides)) if target_channels else None
            nets.append(DetectionSLM(block, fpn, head, adapter, reduce, predictor))
        else:
            if method.share_head:
                head = model.head
                c5 = ctx.module_channels[-1]
                adapter = nn.Conv2d(channels, c5, 1) if channels != c5 else None
            else:
                head, adapter = model.make_head(channels), None
            predictor = MapPredictor([channels] * len(target_channels), target_channels,
                                     [0] * len(target_channels)) if target_channels else None
            nets.append(YOLOSLM(block, head, finer_channels + ahead_channels, channels, adapter, reduce, predictor))
    return nets


def build_fba_bank(method: "FBA", ctx: "BuildContext") -> MultiScaleMapBank:
    """FBA's bank for detection: the earlier modules' finer-scale maps of the step and, with
    ``fba.bank.source=lookahead``, the later modules' coarser maps from the lookahead forward
    (FBA asks only when it has a bank, i.e. ``fba.bank.source`` is not none and K > 1)."""
    sources, ahead = bank_sources(method, ctx)
    return MultiScaleMapBank(sources, ahead)


def build_dgl_aux(ctx: "BuildContext", k: int) -> nn.Module:
    """DGL's auxiliary network for module k: for RetinaNet an :class:`FPNAux` (the module's map
    only: upsampling convs down to P3, stride-2 convs up to P7, a light RetinaNet head), for
    YOLOv1 a fresh YOLO head on the module's map."""
    spec = ctx.last_spec(k)
    if not _is_retinanet(ctx.model):
        return ctx.model.make_head(spec.out_channels)
    settings = local_settings(ctx.model)
    width = settings["channels"]
    fpn = LocalFPN(spec.out_channels, spec.downsample, width, make_finer=True, coarser=settings["coarser"])
    head = LocalRetinaNetHead(ctx.model.plain, fpn.strides, width, ctx.model.head.taps, settings["head_convs"])
    return FPNAux(fpn, head)
