"""Image-restoration metrics: PSNR and SSIM as reported for super-resolution.

The conventions are those of the EDSR/BasicSR evaluation (``reference/baselines.md``):

1. the SR output is clamped to [0, 1] and rounded to 8-bit levels, as a saved PNG would be
   (the HR image is rounded too, a no-op for images read from 8-bit files);
2. by default both images are reduced to the BT.601 luma channel
   ``Y = 16 + (65.738 R + 129.057 G + 25.064 B) / 256`` with R, G, B in 0..255
   (``y_channel=False`` keeps all RGB channels);
3. a border of ``scale`` pixels is shaved from each side;
4. PSNR uses a data range of 255; SSIM is the Gaussian SSIM of Wang et al. (2004), an
   11-tap window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, averaged over the
   positions where the window fits wholly inside the (shaved) image and, in RGB mode, over
   channels. This equals scikit-image's ``structural_similarity(..., gaussian_weights=True,
   sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=...)``.

Inputs are float tensors in [0, 1] of shape ``(3, H, W)`` or ``(N, 3, H, W)``; for a batch the
metric is computed per image and the mean over the N images is returned (the usual
"average PSNR over the test set" when called one image at a time or with a batch of
equally-sized images). Identical images have an infinite PSNR; a batch containing one
therefore averages to ``inf`` too.

Only torch is imported so that ``import fba.metrics`` stays cheap.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["psnr", "ssim", "rgb_to_y", "quantize", "SSIM_WINDOW"]

# BT.601 luma for R, G, B in 0..255 (EDSR's ``calc_psnr``, MATLAB's rgb2ycbcr).
_Y_WEIGHTS = (65.738 / 256, 129.057 / 256, 25.064 / 256)
_Y_OFFSET = 16.0

SSIM_SIGMA = 1.5
# scikit-image's radius for gaussian_weights: int(3.5 * sigma + 0.5) = 5, an 11-tap window.
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1
_K1, _K2 = 0.01, 0.03
_DATA_RANGE = 255.0


def quantize(image: Tensor) -> Tensor:
    """Clamp a [0, 1] image and round it to 8-bit levels, returned in float64 on 0..255."""
    return (image.detach().to(torch.float64).clamp(0, 1) * 255).round()


def rgb_to_y(image255: Tensor) -> Tensor:
    """BT.601 luma of ``(N, 3, H, W)`` RGB on 0..255 -> ``(N, 1, H, W)`` on 16..235."""
    r, g, b = image255.unbind(dim=1)
    y = _Y_OFFSET + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b
    return y[:, None]


def _prepare(sr: Tensor, hr: Tensor, scale: int, y_channel: bool, min_size: int, name: str) -> tuple[Tensor, Tensor]:
    """Validate, batch, quantise, convert and shave: returns two ``(N, C, H', W')`` float64 tensors."""
    if not isinstance(sr, Tensor) or not isinstance(hr, Tensor):
        raise ValueError(f"{name}: sr and hr must be torch tensors, got {type(sr).__name__} and {type(hr).__name__}")
    if sr.shape != hr.shape:
        raise ValueError(f"{name}: sr and hr shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if sr.dim() not in (3, 4):
        raise ValueError(f"{name}: expected (3, H, W) or (N, 3, H, W) images, got shape {tuple(sr.shape)}")
    if sr.dim() == 3:
        sr, hr = sr[None], hr[None]
    if sr.shape[0] == 0:
        raise ValueError(f"{name}: empty batch of shape {tuple(sr.shape)}")
    if y_channel and sr.shape[1] != 3:
        raise ValueError(f"{name}: the Y channel needs 3 RGB channels, got shape {tuple(sr.shape)} (use y_channel=False)")
    if not isinstance(scale, numbers.Integral) or isinstance(scale, bool) or scale < 0:
        raise ValueError(f"{name}: scale (the border to shave) must be a non-negative int, got {scale!r}")
    scale = int(scale)
    height, width = sr.shape[-2] - 2 * scale, sr.shape[-1] - 2 * scale
    if height < min_size or width < min_size:
        raise ValueError(f"{name}: images of {sr.shape[-2]}x{sr.shape[-1]} are too small: after shaving {scale} "
                         f"pixels per side they must be at least {min_size}x{min_size}")
    sr, hr = quantize(sr), quantize(hr)
    if y_channel:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    if scale:
        sr = sr[..., scale:-scale, scale:-scale]
        hr = hr[..., scale:-scale, scale:-scale]
    return sr, hr


def psnr(sr: Tensor, hr: Tensor, scale: int, y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB (data range 255), mean over the images of a batch.

    Args:
        sr: super-resolved output, float ``(3, H, W)`` or ``(N, 3, H, W)`` in [0, 1]; clamped
            and rounded to 8-bit levels first.
        hr: ground truth of the same shape, on 8-bit levels.
        scale: upscaling factor; this many border pixels are shaved from each side.
        y_channel: compare the BT.601 Y channel (default) or all RGB channels.

    Returns ``inf`` for identical images.
    """
    sr, hr = _prepare(sr, hr, scale, y_channel, 1, "psnr")
    mse = (sr - hr).pow(2).flatten(1).mean(dim=1)
    values = [math.inf if m == 0 else 10 * math.log10(_DATA_RANGE**2 / m) for m in mse.tolist()]
    return sum(values) / len(values)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return w / w.sum()


def _blur_valid(x: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian over ``(B, 1, H, W)`` keeping only the positions where the window fits.

    scikit-image filters with reflected borders and then crops the window radius away, so
    the border values never reach its mean; a "valid" filter computes exactly the kept part.
    Weighted sums of shifted views beat ``conv2d``, which has no fast float64 path on CPU.
    """
    k = window.numel()
    weights = window.tolist()
    height, width = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    rows = x[..., 0:height, :] * weights[0]
    for i in range(1, k):
        rows.add_(x[..., i:i + height, :], alpha=weights[i])
    out = rows[..., 0:width] * weights[0]
    for i in range(1, k):
        out.add_(rows[..., i:i + width], alpha=weights[i])
    return out


def ssim(sr: Tensor, hr: Tensor, scale: int, y_channel: bool = True) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window), mean over the images of a batch.

    Args and preprocessing as :func:`psnr`. After shaving, images must be at least
    11x11 (the window). In RGB mode the SSIM of each channel is averaged. Returns 1.0 for
    identical images.
    """
    sr, hr = _prepare(sr, hr, scale, y_channel, SSIM_WINDOW, "ssim")
    n, c = sr.shape[:2]
    # Fold channels into the batch: each channel is filtered on its own.
    x = sr.reshape(n * c, 1, *sr.shape[-2:])
    y = hr.reshape(n * c, 1, *hr.shape[-2:])
    window = _gaussian_window(x.dtype, x.device)
    # One filtering pass over the five maps the SSIM needs.
    stats = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=0), window)
    ux, uy, uxx, uyy, uxy = stats.chunk(5, dim=0)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (_K1 * _DATA_RANGE) ** 2, (_K2 * _DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_image = s.reshape(n, c, -1).mean(dim=2).mean(dim=1)
    return float(per_image.mean())
