"""Light fusion of bank features into an auxiliary network's feature map (paper Eq. 3, the (+))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FUSION_MODES = ("add", "concat")


class LightFusion(nn.Module):
    """Project bank features to the map's channels and add (or concatenate) them.

    Vector bank features ``(N, D)`` go through a linear layer and are broadcast over space;
    map bank features ``(N, D, H', W')`` are resized to the map's resolution (area pooling
    when larger, bilinear when smaller) and projected by a 1x1 conv. The projection starts
    at zero so that an untrained fusion leaves the auxiliary network's input unchanged.
    Bank features are normalised per sample first (layer norm without affine parameters):
    deep residual features grow in scale, and an unnormalised bank lets the projection's
    effective learning rate explode at ordinary SGD learning rates.

    Args:
        bank_channels: D, the bank feature's channel count.
        channels: C, the channel count of the map being fused into.
        mode: ``"add"`` (output has C channels) or ``"concat"`` (output has C + C channels).
        spatial: whether the bank features are maps (True) or vectors (False).
    """

    def __init__(self, bank_channels: int, channels: int, mode: str = "add", spatial: bool = False) -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
        self.mode = mode
        self.spatial = spatial
        self.proj = nn.Conv2d(bank_channels, channels, 1) if spatial else nn.Linear(bank_channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.out_channels = channels * 2 if mode == "concat" else channels

    def forward(self, x: Tensor, bank: Tensor) -> Tensor:
        """x: (N, C, H, W); bank: (N, D) or (N, D, H', W') -> (N, C or 2C, H, W)."""
        bank = bank.to(x.dtype)
        bank = F.group_norm(bank, 1) if self.spatial else F.layer_norm(bank, bank.shape[-1:])
        if self.spatial:
            if bank.shape[-2:] != x.shape[-2:]:
                if bank.shape[-2] >= x.shape[-2]:
                    bank = F.adaptive_avg_pool2d(bank, x.shape[-2:])
                else:
                    bank = F.interpolate(bank, size=x.shape[-2:], mode="bilinear", align_corners=False)
            extra = self.proj(bank)
        else:
            extra = self.proj(bank)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return x + extra if self.mode == "add" else torch.cat([x, extra], dim=1)
