"""The classification task: cross-entropy loss, pooled bank summaries, top-1 evaluation."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClassificationTask:
    name = "classification"
    primary_metric = "top1"
    variable_size_eval = False

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits: (N, num_classes) float; labels: (N,) int64 -> scalar cross-entropy."""
        return F.cross_entropy(logits.float(), labels)

    def summarize(self, h: Tensor) -> Tensor:
        """Global average pooling: (N, C, H, W) -> (N, C), the bank's per-sample vector."""
        return h.mean(dim=(2, 3))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """Top-1 accuracy (a fraction in [0, 1]) and mean cross-entropy over ``batches``."""
        was_training = model.training
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for images, labels, *_ in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
        model.train(was_training)
        if total == 0:
            return {"top1": float("nan"), "loss": float("nan")}
        return {"top1": correct / total, "loss": loss_sum / total}
