"""Detections on arbitrary images, and drawn on them: ``fba eval RUN --images DIR --out DIR``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

Detection = dict[str, Tensor]

#: Distinct colours for up to 20 classes (then they repeat), in the order of the class index.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe",
           "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075",
           "#808080", "#ffe119")


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[Tensor], image_size: int, device: torch.device,
           batch_size: int = 8) -> list[Detection]:
    """Run a detector built for ``image_size`` x ``image_size`` inputs on images of any size.

    Each image (float ``(3, H, W)`` in [0, 1]) is resized to the square the model was trained
    on, as the datasets resize, and its boxes are mapped back to its own pixels. Returns one
    ``{"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,)}`` per image, on the CPU.
    """
    from torchvision.transforms.v2 import functional as TF

    was_training = model.training
    model.eval()
    out: list[Detection] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([TF.resize(image, [image_size, image_size], antialias=True) for image in chunk])
        for image, found in zip(chunk, model(batch.to(device))):
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32) / image_size
            out.append({"boxes": found["boxes"].float().cpu() * scale, "scores": found["scores"].float().cpu(),
                        "labels": found["labels"].cpu()})
    model.train(was_training)
    return out


def draw_detections(image: Tensor, detections: Detection, class_names: Sequence[str],
                    score_threshold: float = 0.3) -> Tensor:
    """``image`` float ``(3, H, W)`` in [0, 1] -> uint8 ``(3, H, W)`` with the detections at or
    above ``score_threshold`` drawn as boxes labelled "class score", one colour per class."""
    from torchvision.utils import draw_bounding_boxes

    canvas = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    keep = detections["scores"] >= score_threshold
    boxes, scores, labels = detections["boxes"][keep], detections["scores"][keep], detections["labels"][keep]
    if len(boxes) == 0:
        return canvas
    names = [class_names[int(label)] if int(label) < len(class_names) else str(int(label)) for label in labels]
    text = [f"{name} {float(score):.2f}" for name, score in zip(names, scores)]
    colours = [PALETTE[int(label) % len(PALETTE)] for label in labels]
    return draw_bounding_boxes(canvas, boxes, labels=text, colors=colours, width=2)
