"""The detection task: the heads' loss dicts summed, pooled bank summaries, COCO mAP."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

Targets = list[dict[str, Tensor]]


def targets_to(targets: Targets, device: torch.device | str) -> Targets:
    """Every tensor of every target dict on ``device``."""
    return [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


class DetectionTask:
    """Object detection. A head returns, in training, an object whose ``losses(targets)`` is a
    torchvision-style loss dict (RetinaNet: ``{"classification", "bbox_regression"}``; YOLOv1:
    ``{"bbox_regression", "objectness", "no_object", "classification"}``); the loss is its sum.

    Attributes:
        last_losses: the loss dict of the last :meth:`loss` call (detached), for logging.
    """

    name = "detection"
    primary_metric = "map50"
    variable_size_eval = False

    def __init__(self) -> None:
        self.last_losses: dict[str, Tensor] = {}

    def loss(self, output: Any, targets: Targets) -> Tensor:
        """``output``: a detection head's training output; ``targets``: one dict per image with
        ``boxes`` ``(M, 4)`` xyxy pixels and ``labels`` ``(M,)`` int64 -> scalar sum of the
        head's losses."""
        if not callable(getattr(output, "losses", None)):
            raise TypeError(f"the detection loss needs a detection head's output, got {type(output).__name__}")
        losses = output.losses(targets)
        self.last_losses = {key: value.detach() for key, value in losses.items()}
        return torch.stack([value.float() for value in losses.values()]).sum()

    def summarize(self, h: Tensor) -> Tensor:
        """Global average pooling: (N, C, H, W) -> (N, C), the bank's per-sample vector."""
        return h.mean(dim=(2, 3))

    @torch.no_grad()
    def predict(self, model: nn.Module, batches: Iterable, device: torch.device,
                on_output: Callable[[int, Tensor, dict[str, Tensor]], None] | None = None
                ) -> tuple[list[dict[str, Tensor]], Targets, float]:
        """Run ``model`` in eval mode over ``(images, targets, indices)`` batches.

        Returns ``(predictions, targets, loss)``: one ``{"boxes", "scores", "labels"}`` and one
        target per image (on the CPU), and the mean training loss per batch where the model's
        output can give it (the learner's heads can; an exported torchvision model cannot: NaN).
        ``on_output(index, image, detections)`` receives each image ``(3, H, W)`` and its
        detections on the CPU (e.g. to draw them) while the batch is at hand.
        """
        was_training = model.training
        model.eval()
        predictions: list[dict[str, Tensor]] = []
        truths: Targets = []
        loss_sum, loss_batches = 0.0, 0
        for images, targets, *rest in batches:
            loaded = images  # as the loader gave them, for on_output
            images = images.to(device) if isinstance(images, Tensor) else [image.to(device) for image in images]
            detections = model(images)
            if callable(getattr(detections, "losses", None)):
                loss_sum += self.loss(detections, targets_to(targets, device)).item()
                loss_batches += 1
            found = targets_to(list(detections), "cpu")
            if on_output is not None:
                for index, image, result in zip(rest[0].tolist(), loaded, found):
                    on_output(index, image.cpu(), result)
            predictions += found
            truths += targets_to(targets, "cpu")
        model.train(was_training)
        return predictions, truths, loss_sum / loss_batches if loss_batches else math.nan

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """COCO-style mAP (``fba.metrics.coco_map``) and the mean ``loss`` (:meth:`predict`)."""
        predictions, truths, loss = self.predict(model, batches, device)
        return detection_metrics(predictions, truths, loss)


def detection_metrics(predictions: list[dict[str, Tensor]], targets: Targets, loss: float) -> dict[str, float]:
    """``fba.metrics.coco_map`` of :meth:`DetectionTask.predict`'s output, with its ``loss``."""
    from fba.metrics import coco_map

    return {**{key: float(value) for key, value in coco_map(predictions, targets).items()}, "loss": loss}


def per_class_table(predictions: list[dict[str, Tensor]], targets: Targets, class_names: list[str] | tuple[str, ...]
                    ) -> tuple[list[dict[str, Any]], str]:
    """VOC AP at IoU 0.5 per class, 11-point (VOC2007, the paper's Table 2) and area (VOC2010+).

    Returns the rows ``{"class", "objects", "ap50_11pt", "ap50_area"}`` (difficult and crowd
    objects neither counted nor penalised, as ``fba.metrics.voc_ap`` rules) with a last
    ``"mean"`` row, and the table as text.
    """
    from fba.metrics import voc_ap

    num_classes = len(class_names)
    eleven = voc_ap(predictions, targets, num_classes, use_07_metric=True)
    area = voc_ap(predictions, targets, num_classes, use_07_metric=False)
    counts = eleven["objects"]
    rows = [{"class": name, "objects": counts[c], "ap50_11pt": eleven["ap"][c], "ap50_area": area["ap"][c]}
            for c, name in enumerate(class_names)]
    rows.append({"class": "mean", "objects": sum(counts), "ap50_11pt": eleven["map"], "ap50_area": area["map"]})
    width = max(len("class"), *(len(str(r["class"])) for r in rows))
    lines = [f"{'class':<{width}}  objects  AP50 (11-pt)  AP50 (area)"]
    for r in rows:
        if r["class"] == "mean":
            lines.append("-" * len(lines[0]))
        lines.append(f"{r['class']:<{width}}  {r['objects']:>7}  {r['ap50_11pt']:>12.4f}  {r['ap50_area']:>11.4f}")
    return rows, "\n".join(lines)
