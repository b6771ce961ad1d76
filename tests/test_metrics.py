"""PSNR/SSIM against scikit-image on real photos, with the reference preprocessing done in numpy."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fba.metrics import psnr, ssim

SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float on 0..1 -> (3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def _reference_prep(image01: np.ndarray, scale: int, y_channel: bool) -> np.ndarray:
    """The EDSR evaluation in plain numpy: round to 8 bits, BT.601 Y, shave ``scale`` pixels."""
    x = np.round(np.clip(image01.astype(np.float64), 0, 1) * 255)
    if y_channel:
        x = 16 + (65.738 * x[..., 0] + 129.057 * x[..., 1] + 25.064 * x[..., 2]) / 256
    return x[scale:-scale, scale:-scale] if scale else x


def _reference(sr01: np.ndarray, hr01: np.ndarray, scale: int, y_channel: bool) -> tuple[float, float]:
    sr = _reference_prep(sr01, scale, y_channel)
    hr = _reference_prep(hr01, scale, y_channel)
    ref_psnr = peak_signal_noise_ratio(hr, sr, data_range=255)
    ref_ssim = structural_similarity(hr, sr, channel_axis=None if y_channel else 2, **SK_SSIM)
    return ref_psnr, ref_ssim


@pytest.fixture(scope="module")
def photo_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HR crops of real photos (on 8-bit levels, in 0..1) and degraded versions (not rounded)."""
    rng = np.random.RandomState(0)
    hr_astro = skdata.astronaut()[40:160, 180:324].astype(np.float64) / 255  # 120x144, face and helmet
    hr_coffee = skdata.coffee()[100:196, 200:330].astype(np.float64) / 255  # 96x130, odd width
    noisy = hr_astro + rng.normal(0, 0.04, hr_astro.shape)  # leaves [0, 1]: exercises clamping
    blurred = gaussian_filter(hr_coffee, sigma=(1.2, 1.2, 0))
    t = _to_tensor(hr_astro)[None]
    small = torch.nn.functional.interpolate(t, scale_factor=0.25, mode="bicubic", antialias=True)
    bicubic = torch.nn.functional.interpolate(small, size=t.shape[-2:], mode="bicubic").clamp(0, 1)
    return {"noisy": (noisy, hr_astro), "blurred": (blurred, hr_coffee),
            "bicubic": (bicubic[0].numpy().transpose(1, 2, 0).astype(np.float64), hr_astro)}


@pytest.mark.parametrize("y_channel", [True, False])
@pytest.mark.parametrize("kind,scale", [("noisy", 2), ("blurred", 3), ("bicubic", 4), ("noisy", 0)])
def test_psnr_and_ssim_match_scikit_image(photo_pairs, kind, scale, y_channel):
    sr, hr = photo_pairs[kind]
    ref_psnr, ref_ssim = _reference(sr, hr, scale, y_channel)
    got_psnr = psnr(_to_tensor(sr), _to_tensor(hr), scale, y_channel=y_channel)
    got_ssim = ssim(_to_tensor(sr), _to_tensor(hr), scale, y_channel=y_channel)
    assert abs(got_psnr - ref_psnr) < 0.01
    assert abs(got_ssim - ref_ssim) < 1e-3
    assert 10 < got_psnr < 45 and 0.3 < got_ssim < 1  # a real, imperfect reconstruction


def test_batch_is_the_mean_over_images(photo_pairs):
    sr_a, hr_a = photo_pairs["noisy"]
    sr_b, hr_b = photo_pairs["bicubic"]
    sr = torch.stack([_to_tensor(sr_a), _to_tensor(sr_b)])
    hr = torch.stack([_to_tensor(hr_a), _to_tensor(hr_b)])
    for metric, index in ((psnr, 0), (ssim, 1)):
        expected = (_reference(sr_a, hr_a, 2, True)[index] + _reference(sr_b, hr_b, 2, True)[index]) / 2
        assert metric(sr, hr, 2) == pytest.approx(expected, abs=1e-3 if index else 0.01)


def test_sr_is_rounded_to_8_bit_levels_before_comparing():
    hr = _to_tensor(skdata.chelsea()[:64, :64].astype(np.float64) / 255)
    # Off by less than half a level everywhere, and out of range where HR is at the ends.
    nudged = hr + 0.4 / 255
    assert psnr(nudged, hr, 2) == math.inf and ssim(nudged, hr, 2) == pytest.approx(1.0, abs=1e-12)
    assert psnr(torch.ones(3, 20, 20) * 1.5, torch.ones(3, 20, 20), 1, y_channel=False) == math.inf


def test_identical_images_give_inf_psnr_and_unit_ssim():
    hr = _to_tensor(skdata.astronaut()[:48, :48].astype(np.float64) / 255)
    assert psnr(hr, hr.clone(), 4) == math.inf and psnr(hr, hr, 4, y_channel=False) == math.inf
    assert ssim(hr, hr.clone(), 4) == pytest.approx(1.0, abs=1e-12)
    assert ssim(hr[None].repeat(2, 1, 1, 1), hr[None].repeat(2, 1, 1, 1), 2, y_channel=False) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_bad_inputs_are_rejected_with_clear_errors(metric):
    good = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="shapes differ"):
        metric(good, torch.rand(3, 32, 30), 2)
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(N, 3, H, W\)"):
        metric(torch.rand(32, 32), torch.rand(32, 32), 2)
    with pytest.raises(ValueError, match="3 RGB channels"):
        metric(torch.rand(1, 32, 32), torch.rand(1, 32, 32), 2)
    with pytest.raises(ValueError, match="too small"):
        metric(torch.rand(3, 14, 32), torch.rand(3, 14, 32), 7)
    with pytest.raises(ValueError, match="scale"):
        metric(good, good, -1)
    with pytest.raises(ValueError, match="torch tensors"):
        metric(good.numpy(), good.numpy(), 2)


def test_ssim_needs_the_full_window_after_shaving():
    # 11x11 is the smallest valid size for SSIM, as in scikit-image; PSNR accepts 1x1.
    assert ssim(torch.rand(3, 15, 15), torch.rand(3, 15, 15), 2) < 1
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(3, 14, 15), torch.rand(3, 14, 15), 2)
    assert math.isfinite(psnr(torch.zeros(3, 5, 5), torch.ones(3, 5, 5), 2))
