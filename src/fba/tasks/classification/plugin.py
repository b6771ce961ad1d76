"""The classification task as a plugin: what build, CLI, config and methods ask of it.

Light at import (no torch): models, data and the task object load inside the methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from fba.tasks import TASKS
from fba.tasks.plugin import TaskPlugin

if TYPE_CHECKING:
    import torch

    from fba.engine.units import UnitModel
    from fba.registry import Registry


class ClassificationPlugin(TaskPlugin):
    """Image classification: CIFAR and torchvision ResNets, cross-entropy, top-1.

    It has no config section of its own: its data keys (``data.per_class_train``,
    ``data.image_size``, ...) predate plugins and stay where configs already set them.
    """

    name = "classification"
    description = "image classification: CIFAR and torchvision ResNets, cross-entropy, top-1"
    primary_metric = "top1"
    metric_label = "test top-1"
    offers = {"dgl": {"aux": "fba.tasks.classification.local:build_dgl_aux"}}

    def model_registry(self) -> "Registry":
        from fba.tasks.classification.models import MODELS

        return MODELS

    def dataset_registry(self) -> "Registry":
        from fba.tasks.classification.data import DATASETS

        return DATASETS

    def build_task(self, config: Mapping[str, Any]) -> Any:
        from fba.tasks.classification.task import ClassificationTask

        return ClassificationTask()

    def build_model(self, config: Mapping[str, Any], num_classes: int, in_channels: int) -> "UnitModel":
        return self.model_registry().get(config["model"])(num_classes=num_classes, in_channels=in_channels)

    def build_datasets(self, config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        data = config["data"]
        builder = self.dataset_registry().get(data["name"])
        return builder(root=data["root"], download=data["download"], augment=data["augment"],
                       per_class_train=data["per_class_train"], per_class_test=data["per_class_test"],
                       image_size=data["image_size"])

    def synthetic_batch(self, config: Mapping[str, Any], batch_size: int, in_channels: int, input_size: int,
                        num_classes: int, generator: "torch.Generator", device: "torch.device") -> tuple[Any, Any]:
        """Normalised-looking images ``(N, C, S, S)`` (standard normal) and labels ``(N,)``."""
        import torch

        images = torch.randn(batch_size, in_channels, input_size, input_size, generator=generator).to(device)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
        return images, labels

    def describe_metrics(self, metrics: Mapping[str, Any]) -> str:
        return f"test top-1 {metrics['top1']:.4f}"

    def export_metadata(self, config: Mapping[str, Any], info: Any) -> dict[str, str]:
        return {"num_classes": str(info.num_classes)}

    def evaluate_run(self, config: Mapping[str, Any], learner: Any, eval_set: Any, device: "torch.device", *,
                     run_dir: Any, images: str | None, out: str | None, info: Any = None
                     ) -> tuple[dict[str, Any], str]:
        """Top-1 and loss of the learner on the test split (batches of ``data.eval_batch_size``)."""
        from torch.utils.data import DataLoader

        from fba.errors import ConfigError

        if images or out:
            raise ConfigError("--images and --out are for super-resolution runs (they write super-resolved PNGs)")
        loader = DataLoader(eval_set, batch_size=config["data"]["eval_batch_size"], num_workers=config["data"]["num_workers"])
        metrics = learner.task.evaluate(learner, loader, device)
        name = config["data"]["name"]
        return {"dataset": name, **metrics}, f"{name} test: top-1 {metrics['top1']:.4f}, loss {metrics['loss']:.4f}"


TASKS.register(ClassificationPlugin.name)(ClassificationPlugin())
