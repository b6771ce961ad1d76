"""FBA: Simple Local Modules fed by a feature bank (paper Eq. 2-4).

The auxiliary network of module k is

    A_k(h) = Head_task( Simplify(b_last)(h) (+) Bank^(k) )

- ``Simplify(b_last)``: a freshly initialised block with the architecture of the last block
  of module k's stage, optionally with its channels divided by ``reduction`` and run at
  ``block_stride`` (its first convolution strided, so the block costs 1/stride^2 of a
  stride-1 one).
- ``Head_task``: a fresh head of the task's own type sized to those channels, or the main
  head itself (``share_head``; the paper's Table 4 ablation), behind a 1x1 channel adapter
  when the channel counts differ. Sharing lets every local loss reach the main head, so the
  head is the one parameter set that is not gradient-isolated in that mode.
- ``head_grid``: the SLM's map is average-pooled to ``g x g`` and the grid folded into
  channels before the head, so a head that pools globally (the classifier) still sees
  coarse spatial layout (``g = 1`` is the plain task head).
- ``(+)``: :class:`~fba.engine.fusion.LightFusion` of the bank features (``usage="input"``).
  With ``usage="target"`` the bank features are not fed in; instead the auxiliary
  network's pooled features are pulled towards them (cosine loss, weight ``target_weight``),
  so a deep feature guides the module without handing its head the answer.

These SLMs and the :class:`~fba.engine.bank.FeatureBank` of ``task.summarize`` vectors are
task-agnostic. A task whose SLM or bank takes another shape (super-resolution's early
full-resolution map) offers FBA its own ``"aux_nets"`` and ``"bank"`` parts, and they are
built from this method's options (:mod:`fba.tasks.plugin`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fba.engine.bank import BANK_SOURCES, BANK_USAGES, FeatureBank, bank_read_channels
from fba.engine.fusion import FUSION_MODES, LightFusion
from fba.methods import METHODS
from fba.methods.base import BuildContext, LocalMethod


class GridFold(nn.Module):
    """``(N, C, H, W) -> (N, D, 1, 1)``: average-pool to ``g x g`` and fold the cells into
    channels (``C*g*g``), then ``hidden`` ``[1x1 conv, BN, ReLU]`` layers (an MLP on the folded
    vector, kept as a map so the task head reads it unchanged).

    The MLP is ``min(C*g*g, max_width)`` wide: ``D`` is that width, or ``C*g*g`` without
    hidden layers. The cap keeps the SLMs of wide backbones small (a 4,096-wide layer on
    ResNet-101's stage 3 would hold 16.8M parameters) and leaves CIFAR ResNets unchanged.
    """

    def __init__(self, channels: int, grid: int, hidden: int = 0, max_width: int = 512) -> None:
        super().__init__()
        self.grid = grid
        width = channels * grid * grid
        hidden_width = min(width, max_width)
        layers: list[nn.Module] = []
        for _ in range(hidden):
            layers += [nn.Conv2d(width, hidden_width, 1, bias=False), nn.BatchNorm2d(hidden_width), nn.ReLU(inplace=True)]
            width = hidden_width
        self.mlp = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, z: Tensor) -> Tensor:
        return self.mlp(F.adaptive_avg_pool2d(z, self.grid).flatten(1)[:, :, None, None])


#: named configurations of the SLM and bank (``fba.preset``); each sets every key it names
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's Eq. 3 as written: a full-width, full-resolution stage-tail block, the task's
    # own head, and the long-term bank's GAP features fused into the SLM's input.
    "paper": {"reduction": 1, "block_stride": 1, "head_grid": 1, "head_hidden": 0, "input_pool": 1, "bank_source": "longterm", "bank_usage": "input"},
}


#: the config key of each constructor argument (presets name arguments too)
CONFIG_KEYS = {"reduction": "fba.reduction", "share_head": "fba.share_head", "block_stride": "fba.block_stride",
               "head_grid": "fba.head_grid", "head_hidden": "fba.head_hidden", "input_pool": "fba.input_pool",
               "bank_source": "fba.bank.source", "bank_usage": "fba.bank.usage", "fusion": "fba.bank.fusion",
               "target_weight": "fba.bank.target_weight", "bank_storage": "fba.bank.storage",
               "bank_dtype": "fba.bank.dtype"}


def _check_preset_agrees(given: Mapping[str, Any], task: str, name: str, preset: Mapping[str, Any]) -> None:
    """Refuse a key that the config (``given``, flattened) sets away from its default to a value
    the preset overrides: the run would silently use the preset's, and its saved config would
    show the other."""
    from fba.config import flatten, task_default_config
    from fba.errors import ConfigError

    defaults = flatten(task_default_config(task))
    for argument, value in preset.items():
        key = CONFIG_KEYS[argument]
        if given[key] != value and given[key] != defaults[key]:
            raise ConfigError(f"fba.preset={name} sets {key}={value!r}, but the config sets it to "
                              f"{given[key]!r}; drop one of the two")


class SimpleLocalModule(nn.Module):
    """Stage-tail block, optional bank fusion, task head.

    ``forward(h, bank=None) -> (output, predicted)``: ``output`` is whatever the task head
    returns; ``predicted`` is the SLM's pooled features projected to the bank's width
    ``(N, D)`` when it has a feature-matching target, else None.
    """

    def __init__(self, block: nn.Module, head: nn.Module, fusion: LightFusion | None = None,
                 target_proj: nn.Module | None = None, adapter: nn.Module | None = None,
                 summarize: Callable[[Tensor], Tensor] | None = None, fold: nn.Module | None = None,
                 pool: nn.Module | None = None) -> None:
        super().__init__()
        self.summarize = summarize
        self.pool = pool
        self.block = block
        self.fusion = fusion
        self.fold = fold
        self.adapter = adapter
        self.head = head
        self.target_proj = target_proj

    def forward(self, h: Tensor, bank: Tensor | None = None) -> tuple[Any, Tensor | None]:
        z = self.block(self.pool(h) if self.pool is not None else h)
        if self.fusion is not None and bank is not None:
            z = self.fusion(z, bank)
        if self.fold is not None:
            z = self.fold(z)
        head_input = self.adapter(z) if self.adapter is not None else z
        if self.target_proj is None:
            return self.head(head_input), None
        if self.adapter is None and hasattr(self.head, "forward_with_embedding"):
            # The feature-matching loss reads the head's own pooled vector: both losses meet at
            # the vector, and one full-size gradient map flows back through the pooling, not two.
            out, pooled = self.head.forward_with_embedding(head_input)
        else:
            out, pooled = self.head(head_input), self.summarize(z)
        return out, self.target_proj(pooled.float())


@METHODS.register("fba")
class FBA(LocalMethod):
    """Feature Bank Augmented auxiliary networks.

    Args:
        reduction: divide the SLM block's channels by this (1 keeps them).
        block_stride: stride of the SLM block's first convolution (1 keeps the module's resolution).
        input_pool: average-pool the module's output by this factor before the SLM block.
        head_grid: pool the SLM's map to this grid and fold it into channels before the head.
        head_hidden: hidden ``[1x1 conv, BN, ReLU]`` layers on the folded vector before the head.
        share_head: use the main head's parameters in every SLM instead of copies.
        bank_source: one of ``none``, ``inpass``, ``longterm``, ``lookahead``.
        bank_usage: ``input`` (fused into the SLM) or ``target`` (a feature-matching loss).
        fusion: ``add`` or ``concat``.
        target_weight: weight of the feature-matching loss in ``target`` mode.
        bank_storage: device of the long-term table (``cpu`` or ``device``).
        bank_dtype: ``float16`` or ``float32`` for the long-term table.
    """

    name = "fba"
    # Each module's update reads only its own loss, so stepping module k right after its
    # backward gives the same weights as one global step, and no gradient outlives its module.
    default_step = "per_module"

    def __init__(self, reduction: int = 1, share_head: bool = False, bank_source: str = "longterm",
                 bank_usage: str = "target", fusion: str = "add", target_weight: float = 1.0,
                 bank_storage: str = "cpu", bank_dtype: str = "float16", block_stride: int = 1,
                 head_grid: int = 2, head_hidden: int = 2, input_pool: int = 4) -> None:
        for name, value in (("reduction", reduction), ("block_stride", block_stride), ("head_grid", head_grid),
                            ("input_pool", input_pool)):
            if value < 1:
                raise ValueError(f"fba.{name} must be >= 1, got {value}")
        if head_hidden < 0:
            raise ValueError(f"fba.head_hidden must be >= 0, got {head_hidden}")
        for name, value, choices in (("bank_source", bank_source, BANK_SOURCES), ("bank_usage", bank_usage, BANK_USAGES),
                                     ("fusion", fusion, FUSION_MODES)):
            if value not in choices:
                raise ValueError(f"fba {name} must be one of {choices}, got {value!r}")
        self.reduction = reduction
        self.block_stride = block_stride
        self.head_grid = head_grid
        self.head_hidden = head_hidden
        self.input_pool = input_pool
        self.share_head = share_head
        self.bank_source = bank_source
        self.bank_usage = bank_usage
        self.fusion = fusion
        self.target_weight = target_weight
        self.bank_storage = bank_storage
        self.bank_dtype = getattr(torch, bank_dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FBA":
        from fba.config import flatten

        given = flatten(config)
        kwargs = {argument: given[key] for argument, key in CONFIG_KEYS.items()}
        name = given["fba.preset"]
        if name is not None:
            _check_preset_agrees(given, config["task"], name, PRESETS[name])
            kwargs.update(PRESETS[name])
        return cls(**kwargs)

    def build_bank(self, ctx: BuildContext) -> FeatureBank | None:
        if self.bank_source == "none" or ctx.K == 1:
            return None
        task_bank = ctx.task_part(self.name, "bank")
        if task_bank is not None:  # e.g. a bank of whole maps rather than summaries
            return task_bank(self, ctx)
        return FeatureBank(self.bank_source, ctx.module_channels, ctx.module_stages, ctx.task.summarize, num_samples=ctx.num_samples,
                           storage_device=self.bank_storage if self.bank_storage == "cpu" else ctx.extra.get("device", "cpu"),
                           storage_dtype=self.bank_dtype)

    def build_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        """K-1 SLMs: the task's own when it offers ``"aux_nets"``, else the task-agnostic ones."""
        task_slms = ctx.task_part(self.name, "aux_nets")
        if task_slms is not None:
            return task_slms(self, ctx)
        return self.build_generic_aux_nets(ctx)

    def build_generic_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        """Stage-tail block, light fusion or a feature-matching projection, and the task's head.

        Module k's SLM maps ``(N, C_k, H_k, W_k)`` (and the bank's read for k) to the task
        head's output; ``task.summarize`` gives the vectors the bank and the matching use.
        """
        module_channels, module_stages = ctx.module_channels, ctx.module_stages
        head_channels = ctx.model.specs[-1].out_channels
        nets = []
        for k in range(ctx.K - 1):
            spec = ctx.last_spec(k)
            channels = max(1, spec.out_channels // self.reduction)
            block = ctx.model.make_stage_block(max(1, spec.stage), spec.out_channels, channels, self.block_stride)
            # ceil_mode: a map smaller than the window still yields one cell
            pool = nn.AvgPool2d(self.input_pool, ceil_mode=True) if self.input_pool > 1 else None
            bank_channels = bank_read_channels(self.bank_source, module_channels, module_stages, k)
            fusion = target_proj = None
            if bank_channels and self.bank_usage == "input":
                fusion = LightFusion(bank_channels, channels, self.fusion)
                channels = fusion.out_channels
            fold = None
            if self.head_grid > 1 or self.head_hidden:
                fold = GridFold(channels, self.head_grid, self.head_hidden)
                channels = fold.out_channels
            if bank_channels and self.bank_usage == "target":
                target_proj = nn.Linear(channels, bank_channels)
            if self.share_head:
                head = ctx.model.head
                adapter = nn.Conv2d(channels, head_channels, 1, bias=False) if channels != head_channels else None
            else:
                head, adapter = ctx.model.make_head(channels), None
            nets.append(SimpleLocalModule(block, head, fusion, target_proj, adapter, ctx.task.summarize, fold, pool))
        return nets

    def local_loss(self, k: int, aux: nn.Module, h: Tensor, targets: Any, bank: FeatureBank | None) -> Tensor:
        features, valid = bank.read(k, h.device) if bank is not None else (None, None)
        out, predicted = aux(h, features if self.bank_usage == "input" else None)
        loss = self.task.loss(out, targets)
        if predicted is not None and features is not None:
            loss = loss + self.target_weight * feature_mismatch(predicted, features, valid)
        return loss


def feature_mismatch(predicted: Tensor | list[Tensor], features: Tensor | list[Tensor],
                     valid: Tensor | None = None) -> Tensor:
    """Mean ``1 - cosine`` between predictions and bank features, over channels (dim 1).

    Vectors ``(N, D)`` (``valid``: ``(N,)``, the rows that have a target), or lists of maps
    ``(N, C, H, W)``, each prediction average-pooled to its target's size first (a local FPN
    level finer than the deep map it predicts); the mean over maps of each map's mean.
    """
    if isinstance(predicted, Tensor):
        mismatch = 1.0 - F.cosine_similarity(predicted.float(), features.float(), dim=1)
        if valid is None:
            return mismatch.mean()
        # The mean over the rows that have a target: rows not yet filled must not dilute the
        # loss of the rows that are.
        valid = valid.float()
        return (mismatch * valid).sum() / valid.sum().clamp(min=1.0)
    if len(predicted) != len(features):
        raise ValueError(f"{len(predicted)} predicted maps for {len(features)} bank maps")
    per_map = []
    for p, f in zip(predicted, features):
        if p.shape[-2:] != f.shape[-2:]:
            p = F.adaptive_avg_pool2d(p, f.shape[-2:])
        per_map.append((1.0 - F.cosine_similarity(p.float(), f.float(), dim=1)).mean())
    return torch.stack(per_map).mean()
