"""Metrics: PSNR and SSIM for super-resolution; COCO mAP and VOC AP for detection.

Super-resolution
----------------

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

Detection
---------

Boxes are xyxy in pixels, labels 0-based ints; ``predictions`` and ``targets`` are lists
with one dict per image (tensors, numpy arrays or lists).

- :func:`coco_map` runs pycocotools' ``COCOeval`` (bbox) on ground truth and detections
  built in memory. A box's area (for small/medium/large) is its box area, there being no
  masks. ``iscrowd`` targets are crowd regions as in COCO, and ``difficult`` ones are passed
  to pycocotools as crowd regions too: they count neither as objects to find nor as false
  positives, and a detection lying mostly inside one (intersection over the detection's
  area at the IoU threshold, COCO's crowd rule) is ignored. Values pycocotools cannot
  define (it reports -1: no ground truth at all, or none in an area range) are ``nan``;
  ground truth without a single detection scores 0.0.
- :func:`voc_ap` is the VOC devkit's per-class average precision, written from its
  definition: detections of a class sorted by score, each compared with the ground-truth
  box of highest IoU in its image, matched or not (a match needs IoU >= the threshold, as
  in the MATLAB devkit and COCO); a detection whose best box is "difficult" is ignored, and
  one whose best box is already matched is a false positive, even where another box it
  overlaps enough is free (the devkit's rule). AP is the 11-point interpolated
  precision (VOC2007, the default) or the area under the interpolated precision-recall
  curve (VOC2010 and later). IoU uses continuous coordinates; with VOC boxes read as
  ``[xmin - 1, ymin - 1, xmax, ymax]`` this equals the devkit's "+1" pixel arithmetic.

Only torch is imported at module level so that ``import fba.metrics`` stays cheap.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["psnr", "ssim", "rgb_to_y", "quantize", "SSIM_WINDOW", "coco_map", "voc_ap", "COCO_METRIC_NAMES"]

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


# --------------------------------------------------------------------------- detection

#: the keys of :func:`coco_map`, in the order of pycocotools' ``COCOeval.stats``
COCO_METRIC_NAMES = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
                     "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")


def _as_array(value: object, dtype: str, shape_tail: tuple[int, ...], name: str):
    import numpy as np

    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=dtype)
    if array.size == 0:
        array = array.reshape((0, *shape_tail))
    if array.shape[1:] != shape_tail or array.ndim != 1 + len(shape_tail):
        raise ValueError(f"{name} must have shape (N{''.join(f', {d}' for d in shape_tail)}), got {array.shape}")
    return array


def _detections(predictions: list, targets: list, name: str) -> tuple[list, list]:
    """Validate and convert to numpy: ``[(boxes (K,4), scores (K,), labels (K,))]`` and
    ``[(boxes (M,4), labels (M,), crowd (M,), difficult (M,))]``."""
    import numpy as np

    if len(predictions) != len(targets):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(targets)} targets (one dict per image each)")
    preds, gts = [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        boxes = _as_array(p["boxes"], "float64", (4,), f"{name}: predictions[{i}]['boxes']")
        scores = _as_array(p["scores"], "float64", (), f"{name}: predictions[{i}]['scores']")
        labels = _as_array(p["labels"], "int64", (), f"{name}: predictions[{i}]['labels']")
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"{name}: predictions[{i}] has {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        preds.append((boxes, scores, labels))
        t_boxes = _as_array(t["boxes"], "float64", (4,), f"{name}: targets[{i}]['boxes']")
        t_labels = _as_array(t["labels"], "int64", (), f"{name}: targets[{i}]['labels']")
        flags = []
        for key in ("iscrowd", "difficult"):
            flag = t.get(key) if isinstance(t, dict) else None
            flags.append(np.zeros(len(t_labels), dtype=bool) if flag is None
                         else _as_array(flag, "bool", (), f"{name}: targets[{i}][{key!r}]"))
        if not len(t_boxes) == len(t_labels) == len(flags[0]) == len(flags[1]):
            raise ValueError(f"{name}: targets[{i}] has {len(t_boxes)} boxes but {len(t_labels)} labels "
                             f"(or flags of another length)")
        gts.append((t_boxes, t_labels, flags[0], flags[1]))
    return preds, gts


def coco_map(predictions: list[dict], targets: list[dict]) -> dict[str, float]:
    """COCO box mAP through pycocotools (module docstring for the conventions).

    Args:
        predictions: per image ``{"boxes": (K, 4) xyxy pixels, "scores": (K,), "labels": (K,)}``.
        targets: per image ``{"boxes": (M, 4) xyxy pixels, "labels": (M,)}`` with optional
            bool ``"iscrowd"`` and ``"difficult"`` ``(M,)``.

    Returns ``{name: float}`` for :data:`COCO_METRIC_NAMES`: ``map`` (AP at IoU .50:.95),
    ``map50``, ``map75``, ``map_small|medium|large``, ``mar_1|10|100`` (AR at 1, 10, 100
    detections per image) and ``mar_small|medium|large``.
    """
    import contextlib
    import io

    import numpy as np

    preds, gts = _detections(predictions, targets, "coco_map")
    images, annotations, categories = [], [], set()
    for i, (boxes, labels, crowd, difficult) in enumerate(gts):
        # COCOeval needs no image size for boxes; the entry only declares the image id.
        images.append({"id": i + 1})
        for box, label, is_crowd, is_difficult in zip(boxes.tolist(), labels.tolist(), crowd, difficult):
            w, h = box[2] - box[0], box[3] - box[1]
            # Ids from 1: COCOeval marks unmatched detections with ground-truth id 0.
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h,
                                "iscrowd": int(bool(is_crowd) or bool(is_difficult))})
            categories.add(int(label) + 1)
    results = []
    for i, (boxes, scores, labels) in enumerate(preds):
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": i + 1, "category_id": int(label) + 1,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
            categories.add(int(label) + 1)
    counted = any(a["iscrowd"] == 0 for a in annotations)
    if not counted:
        return {name: math.nan for name in COCO_METRIC_NAMES}
    if not results:
        # pycocotools cannot load an empty result list; finding nothing scores 0 wherever
        # there is something to find.
        stats = _coco_stats_without_detections(annotations)
        return dict(zip(COCO_METRIC_NAMES, stats))
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in sorted(categories)]}
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=float)
    return {name: (math.nan if value < 0 else float(value)) for name, value in zip(COCO_METRIC_NAMES, stats)}


def _coco_stats_without_detections(annotations: list[dict]) -> list[float]:
    """What COCOeval gives for no detections: 0 where an area range has counted ground truth, else nan."""
    areas = [a["area"] for a in annotations if a["iscrowd"] == 0]
    # COCOeval's area ranges: all, small < 32^2 <= medium < 96^2 <= large.
    ranges = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}
    has = {k: any(lo <= a <= hi for a in areas) for k, (lo, hi) in ranges.items()}
    order = ["all", "all", "all", "small", "medium", "large", "all", "all", "all", "small", "medium", "large"]
    return [0.0 if has[k] else math.nan for k in order]


def _box_iou(box, boxes):
    """IoU of one xyxy box with ``(M, 4)`` boxes, continuous coordinates."""
    import numpy as np

    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _average_precision(recall, precision, use_07_metric: bool) -> float:
    import numpy as np

    if use_07_metric:
        # Mean over recall levels 0, 0.1, ..., 1 of the best precision at recall >= the level.
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    # Area under the precision envelope (precision made non-increasing from the right),
    # summed over the steps where recall changes.
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def voc_ap(predictions: list[dict], targets: list[dict], num_classes: int, iou_threshold: float = 0.5,
           use_07_metric: bool = True) -> dict[str, float | list[float]]:
    """PASCAL VOC average precision per class (module docstring for the matching rule).

    Args:
        predictions: per image ``{"boxes": (K, 4) xyxy, "scores": (K,), "labels": (K,)}``.
        targets: per image ``{"boxes": (M, 4) xyxy, "labels": (M,)}``, optional bool
            ``"difficult"`` ``(M,)`` (ignored objects; ``"iscrowd"`` is treated the same).
        num_classes: classes are ``0 .. num_classes - 1``; other labels are an error.
        iou_threshold: the least IoU of a true positive.
        use_07_metric: 11-point interpolation (VOC2007) if True, else the area (VOC2010+).

    Returns ``{"map": mean over classes with ground truth, "ap": [AP of class c], "objects":
    [ground-truth objects of class c that count]}``; a class with no (non-difficult) ground
    truth has AP ``nan`` and is left out of the mean (``map`` is ``nan`` when no class has any).
    """
    import numpy as np

    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"voc_ap: num_classes must be a positive int, got {num_classes!r}")
    preds, gts = _detections(predictions, targets, "voc_ap")
    for i, ((_, _, p_labels), (_, t_labels, _, _)) in enumerate(zip(preds, gts)):
        for kind, labels in (("predictions", p_labels), ("targets", t_labels)):
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"voc_ap: {kind}[{i}] has a label outside 0..{num_classes - 1}: {labels.tolist()}")
    ap, objects = [], []
    for c in range(num_classes):
        gt_boxes = [boxes[labels == c] for boxes, labels, _, _ in gts]
        ignored = [(crowd | difficult)[labels == c] for _, labels, crowd, difficult in gts]
        npos = int(sum((~flags).sum() for flags in ignored))
        objects.append(npos)
        taken = [np.zeros(len(b), dtype=bool) for b in gt_boxes]
        det_image, det_score, det_box = [], [], []
        for i, (boxes, scores, labels) in enumerate(preds):
            mask = labels == c
            det_image += [i] * int(mask.sum())
            det_score.append(scores[mask])
            det_box.append(boxes[mask])
        if npos == 0:
            ap.append(math.nan)
            continue
        scores = np.concatenate(det_score) if det_score else np.zeros(0)
        boxes = np.concatenate(det_box) if det_box else np.zeros((0, 4))
        order = np.argsort(-scores, kind="stable")
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for rank, d in enumerate(order):
            image = det_image[d]
            candidates = gt_boxes[image]
            if len(candidates) == 0:
                fp[rank] = 1
                continue
            ious = _box_iou(boxes[d], candidates)
            best = int(np.argmax(ious))
            if ious[best] < iou_threshold:
                fp[rank] = 1
            elif ignored[image][best]:
                pass  # a difficult object: found or not, it does not count
            elif not taken[image][best]:
                tp[rank], taken[image][best] = 1, True
            else:
                fp[rank] = 1  # a duplicate detection
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap.append(_average_precision(recall, precision, use_07_metric))
    counted = [v for v in ap if not math.isnan(v)]
    return {"map": float(np.mean(counted)) if counted else math.nan, "ap": ap, "objects": objects}
