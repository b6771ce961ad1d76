"""The super-resolution task: L1 loss, PSNR/SSIM evaluation beside the bicubic baseline."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SuperResolutionTask:
    """L1 reconstruction of the HR image; metrics on 8-bit levels (EDSR/BasicSR convention).

    Args:
        scale: the upscaling factor (sets the metrics' border shave).
        y_channel: evaluate PSNR/SSIM on the BT.601 Y channel (True) or on RGB.
    """

    name = "super_resolution"
    primary_metric = "psnr"
    #: validation images differ in size, so they are evaluated one at a time.
    variable_size_eval = True

    def __init__(self, scale: int, y_channel: bool = True) -> None:
        self.scale = scale
        self.y_channel = y_channel

    def loss(self, sr: Tensor, hr: Tensor) -> Tensor:
        """sr, hr: (N, 3, H, W) in [0, 1] -> scalar mean absolute error."""
        return F.l1_loss(sr.float(), hr)

    def summarize(self, h: Tensor) -> Tensor:
        """Maps are kept whole: the SR bank stores the early full-resolution map itself."""
        return h

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device,
                 on_output: Callable[[int, Tensor], None] | None = None) -> dict[str, float]:
        """Mean PSNR/SSIM of ``model`` and of bicubic upscaling over ``(lr, hr, index)`` batches.

        ``on_output(index, sr)`` receives each clamped SR image ``(3, H, W)`` (e.g. to save it).
        """
        from fba.metrics import psnr, ssim
        from fba.tasks.super_resolution.data import bicubic_upscale

        was_training = model.training
        model.eval()
        sums = {"psnr": 0.0, "ssim": 0.0, "psnr_bicubic": 0.0, "ssim_bicubic": 0.0, "loss": 0.0}
        count = 0
        for lr, hr, index in batches:
            lr, hr = lr.to(device), hr.to(device)
            sr = model(lr).float().clamp_(0, 1)
            bicubic = torch.stack([bicubic_upscale(image, self.scale) for image in lr.cpu()]).to(device)
            for i in range(lr.shape[0]):
                sums["psnr"] += psnr(sr[i], hr[i], self.scale, y_channel=self.y_channel)
                sums["ssim"] += ssim(sr[i], hr[i], self.scale, y_channel=self.y_channel)
                sums["psnr_bicubic"] += psnr(bicubic[i], hr[i], self.scale, y_channel=self.y_channel)
                sums["ssim_bicubic"] += ssim(bicubic[i], hr[i], self.scale, y_channel=self.y_channel)
                sums["loss"] += F.l1_loss(sr[i], hr[i]).item()
                if on_output is not None:
                    on_output(int(index[i]), sr[i].cpu())
            count += lr.shape[0]
        model.train(was_training)
        if count == 0:
            return {key: float("nan") for key in sums}
        return {key: value / count for key, value in sums.items()}
