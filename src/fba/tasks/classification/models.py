"""Classification backbones exposed as units + head (see :class:`fba.engine.units.UnitModel`).

- CIFAR ResNets (``resnet8/20/32/56/110``): a 3x3 stem and three stages of BasicBlocks,
  16/32/64 wide, at strides 1/2/4; ``resnet8`` is the tiny variant for tests.
- torchvision ResNets (``resnet18..152``): torchvision's own definitions, so the exported
  model's ``state_dict`` loads strictly into ``torchvision.models.resnetXX``.
Units are the stem and then every residual block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from fba.engine.units import UnitModel, UnitSpec
from fba.registry import Registry

MODELS: Registry[Callable[..., UnitModel]] = Registry("model")


class ClassifierHead(nn.Module):
    """Global average pooling then a linear layer: ``(N, C, H, W) -> (N, num_classes)``."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, h: Tensor) -> Tensor:
        return self.forward_with_embedding(h)[0]

    def forward_with_embedding(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, pooled)``: the pooled vector lets a second loss share the pooling's backward."""
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
        return self.fc(pooled), pooled


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, section 4.2) built from torchvision blocks.

    Depth = 6n + 2 with n BasicBlocks per stage; shortcuts that change shape use a 1x1
    conv + BN projection.
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layer1 = _basic_stage(16, 16, n, stride=1)
        self.layer2 = _basic_stage(16, 32, n, stride=2)
        self.layer3 = _basic_stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))


def _basic_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [tv_resnet.BasicBlock(in_channels, out_channels, stride, _projection(in_channels, out_channels, stride))]
    layers += [tv_resnet.BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def make_stage_block(block_type: type, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """A fresh block of ``block_type`` mapping in_channels -> out_channels (1x1 projection if needed)."""
    projection = _projection(in_channels, out_channels, stride)
    if block_type is tv_resnet.Bottleneck:
        if out_channels % tv_resnet.Bottleneck.expansion:
            raise ValueError(f"a Bottleneck needs out_channels divisible by 4, got {out_channels}")
        return tv_resnet.Bottleneck(in_channels, out_channels // 4, stride, projection)
    return tv_resnet.BasicBlock(in_channels, out_channels, stride, projection)


def stage_blocks(layers: list[nn.Sequential], first_stride: int, channels_of: Callable[[nn.Module], int],
                 prefix: str = "") -> tuple[list[nn.Module], list[UnitSpec], list[type]]:
    """Every residual block of the stages ``layers`` as a unit, its spec (named
    ``prefix + "layerS.i"``, downsampling counted from ``first_stride``), and each stage's block type."""
    units, specs, block_types = [], [], []
    downsample = first_stride
    for stage, layer in enumerate(layers, start=1):
        for i, block in enumerate(layer):
            downsample *= block.stride if isinstance(block.stride, int) else 1
            units.append(block)
            specs.append(UnitSpec(f"{prefix}layer{stage}.{i}", channels_of(block), downsample, stage))
        block_types.append(type(layer[-1]))
    return units, specs, block_types


def _unit_model(plain: nn.Module, stem: nn.Module, stem_spec: UnitSpec, layers: list[nn.Sequential], fc: nn.Linear) -> UnitModel:
    def channels_of(block: nn.Module) -> int:
        return block.bn3.num_features if isinstance(block, tv_resnet.Bottleneck) else block.bn2.num_features

    units, specs, block_types = stage_blocks(layers, stem_spec.downsample, channels_of)
    num_classes = fc.out_features

    def stage_block(stage: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        return make_stage_block(block_types[stage - 1], in_channels, out_channels, stride)

    return UnitModel(
        plain=plain,
        units=[stem, *units],
        specs=[stem_spec, *specs],
        head=ClassifierHead(fc),
        make_stage_block=stage_block,
        make_head=lambda channels: ClassifierHead(nn.Linear(channels, num_classes)),
    )


def _cifar(depth: int) -> Callable[..., UnitModel]:
    def build(num_classes: int = 10, in_channels: int = 3) -> UnitModel:
        net = CifarResNet(depth, num_classes, in_channels)
        return _unit_model(net, net.stem, UnitSpec("stem", 16, 1, 0), [net.layer1, net.layer2, net.layer3], net.fc)

    build.__doc__ = f"CIFAR ResNet-{depth}: stem + 3 x {(depth - 2) // 6} BasicBlocks, {(depth - 2) // 2 + 1} units."
    return build


class TorchvisionStem(nn.Module):
    """conv1-bn1-relu-maxpool of a torchvision ResNet, as one unit (parameters stay in the ResNet)."""

    def __init__(self, net: tv_resnet.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _torchvision(name: str) -> Callable[..., UnitModel]:
    def build(num_classes: int = 1000, in_channels: int = 3) -> UnitModel:
        net = getattr(tv_resnet, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return _unit_model(net, TorchvisionStem(net), UnitSpec("stem", 64, 4, 0),
                           [net.layer1, net.layer2, net.layer3, net.layer4], net.fc)

    build.__doc__ = f"torchvision {name} (weights=None): stem + every residual block as units."
    return build


for _depth in (8, 20, 32, 56, 110):
    MODELS.register(f"resnet{_depth}")(_cifar(_depth))
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    MODELS.register(_name)(_torchvision(_name))
