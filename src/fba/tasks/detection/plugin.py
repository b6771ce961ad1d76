"""The detection task as a plugin: what build, CLI, config and methods ask of it.

Light at import (no torch): models, data and the task object load inside the methods.
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fba.rules import boolean, optional_positive_int, unit_interval
from fba.tasks import TASKS
from fba.tasks.plugin import TaskPlugin

if TYPE_CHECKING:
    import torch

    from fba.engine.units import UnitModel
    from fba.registry import Registry


def anchor_sizes_rule(value: Any) -> str | None:
    """``det.anchor_sizes``: null (scaled to the image size) or five base sizes of at least one
    pixel (the anchors are whole pixels: a smaller size would round to an empty anchor)."""
    ok = value is None or (isinstance(value, (list, tuple)) and len(value) == 5 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in value))
    return None if ok else "null or a list of 5 anchor sizes (P3..P7) of at least 1 pixel"


def fpn_channels_rule(value: Any) -> str | None:
    """``det.fpn_channels``: a positive multiple of 32 (the head's GroupNorm has 32 groups)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % 32 == 0
    return None if ok else "a positive multiple of 32"


#: RetinaNet box losses that torchvision's regression head offers and that are offered here
#: (defined here, not in ``models``, so that the config rules need no torch)
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")
#: how a local FPN uses a coarser lookahead map (``det.lookahead_fusion``), see ``local.LocalFPN``
LOOKAHEAD_FUSIONS = ("replace", "add")
#: the ``det`` keys that the local auxiliary networks read (``fba.tasks.detection.local``)
LOCAL_KEYS = ("local_channels", "local_head_convs", "local_coarser", "local_finer", "local_min_stride",
              "local_zero_init", "lookahead_fusion")


class DetectionPlugin(TaskPlugin):
    """Object detection: RetinaNet and YOLOv1 on ResNets, trained from scratch; COCO mAP.

    The image size is ``data.image_size``: the datasets resize to it and the models are
    built for it (RetinaNet's transform and default anchors, YOLO's default grid). Its
    config section ``det`` has these keys:

    - ``anchor_sizes``: RetinaNet's base anchor size on P3..P7, or null for
      :func:`~fba.tasks.detection.models.default_anchor_sizes` of the image size
      (32..512 from 512 px up, scaled down below: 8..128 at 128 px);
    - ``fpn_channels``: width of RetinaNet's FPN and head (torchvision's 256; a multiple of 32);
    - ``box_loss``: RetinaNet's box regression loss, ``l1`` (torchvision's v1) or ``giou``
      (its v2 recipe), also ``smooth_l1``, ``diou``, ``ciou``; the local heads use the same;
    - ``yolo_grid``: YOLOv1's S, or null for one cell per C5 pixel (image size / 32);
    - ``local_channels``: width of the local FPN and head of FBA's SLMs and DGL's FPN aux
      (null: 64 divided by ``fba.reduction``, at least 16);
    - ``local_head_convs``: 3x3 convs per branch of their RetinaNet heads (1..4; the main
      head has 4);
    - ``local_coarser``: whether their local FPNs make the coarser levels (up to P7) by
      stride-2 convs;
    - ``local_finer``: FBA's SLMs that read no bank map make the finer levels down to P3 from
      their own map, by nearest upsampling and 3x3 convs, as DGL's auxiliary nets do;
    - ``local_min_stride``: null, or 8/16/32: FBA's SLM of a module finer than that brings its
      map there by stride-2 convs before its block (a lighter SLM: less memory at module 0);
    - ``local_zero_init``: FBA's SLM blocks start as their shortcut (the last BatchNorm's
      scale zeroed, torchvision's ``zero_init_residual``);
    - ``lookahead_fusion``: with ``fba.bank.source=lookahead``, how the coarser maps of the
      lookahead forward enter an SLM's local FPN: ``replace`` (each is that level's lateral,
      as in the main FPN) or ``add`` (added to a level made from the module's own map);
    - ``draw_score``: the least score of a detection that ``fba eval --images/--out`` draws.
    """

    name = "detection"
    description = "object detection: RetinaNet and YOLOv1 on ResNets from scratch, COCO mAP"
    config_section = "det"
    config_defaults = {"anchor_sizes": None, "fpn_channels": 256, "box_loss": "l1", "yolo_grid": None,
                       "local_channels": None, "local_head_convs": 1,
                       "local_coarser": True, "local_finer": False, "local_min_stride": None, "local_zero_init": False,
                       "lookahead_fusion": "replace",
                       "draw_score": 0.3}
    config_rules = {"anchor_sizes": anchor_sizes_rule, "fpn_channels": fpn_channels_rule,
                    "box_loss": BOX_LOSSES, "yolo_grid": optional_positive_int,
                    "local_channels": optional_positive_int, "local_head_convs": (1, 2, 3, 4), "local_coarser": boolean,
                    "local_finer": boolean, "local_min_stride": (None, 8, 16, 32), "local_zero_init": boolean,
                    "lookahead_fusion": LOOKAHEAD_FUSIONS,
                    "draw_score": unit_interval}
    # ``task=detection`` alone: RetinaNet-R18 on the built-in shapes at 128 px, K=4 by stage,
    # 1,800 steps of batch 8 (9 epochs of the 1,600 training images). These are the built-in
    # run's settings; the paper configs (configs/voc, configs/coco) set the paper's own.
    # docs/detection.md has the measurements behind each choice.
    task_defaults = {
        "model": "retinanet_resnet18",
        "K": 4,
        "data": {"name": "shapes-det", "batch_size": 8, "eval_batch_size": 16, "image_size": 128, "augment": True},
        # A 128-wide FPN and head: the 256-wide head is 60% of a BP step at 128 px, so about the same
        # 20 minutes hold 8 epochs instead of 5 (mAP@0.5 0.190 -> 0.282 with SGD).
        "det": {"fpn_channels": 128},
        # AdamW at 1e-3 (weight decay 0.05), warm-up and cosine: from scratch at this budget it
        # beat the paper's SGD at 0.01 (5 epochs, 256 wide: mAP@0.5 0.232 against 0.190/0.191).
        # Per-module steps: the same updates as one global step (each module's loss reads only
        # its own parameters and detached inputs), with one module's gradients alive at a time.
        "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 0.25,
                  "step": "per_module"},
        # Nine epochs: 17 min 45 s on 2 cores, mAP@0.5 0.503, 0.514 and 0.577 on seeds 0-2
        # (eight: 15 min 18 s, 0.433-0.438).
        "train": {"epochs": 9},
        # Module 0 (the stem and layer1, stride 4) sets local learning's peak: checkpointing it
        # alone moves the peak to the last module's (RetinaNet-R34 K=4: 0.555 -> 0.510 of BP)
        # for one recomputed forward of that module (docs/detection.md, Memory).
        "checkpoint": [0],
        # No bank by default: at K=4 by stage the in-pass maps (C3 into SLM 2's local FPN) cost
        # 0.03 mAP@0.5 on both seeds (0.415/0.400 with, 0.438/0.433 without), and lookahead C4/C5
        # more (docs/detection.md, the bank ablation). fba.bank.source=inpass or lookahead turn it
        # on; the paper configs (configs/voc, configs/coco) do.
        "fba": {"bank": {"source": "none", "usage": "input"}},
    }
    primary_metric = "map50"
    metric_label = "validation mAP@0.5"
    offers: Mapping[str, Mapping[str, Any]] = {
        "fba": {"aux_nets": "fba.tasks.detection.local:build_fba_slms",
                "bank": "fba.tasks.detection.local:build_fba_bank"},
        "dgl": {"aux": "fba.tasks.detection.local:build_dgl_aux"},
    }

    def model_registry(self) -> "Registry":
        from fba.tasks.detection.models import MODELS

        return MODELS

    def dataset_registry(self) -> "Registry":
        from fba.tasks.detection.data import DATASETS

        return DATASETS

    def build_task(self, config: Mapping[str, Any]) -> Any:
        from fba.tasks.detection.task import DetectionTask

        return DetectionTask()

    def build_model(self, config: Mapping[str, Any], num_classes: int, in_channels: int) -> "UnitModel":
        """Sized by the classes and ``data.image_size``; ``det`` options go to the builders
        that take them (anchors to RetinaNet, the grid to YOLOv1)."""
        builder = self.model_registry().get(config["model"])
        accepted = inspect.signature(builder).parameters
        options = {"anchor_sizes": config["det"]["anchor_sizes"], "fpn_channels": config["det"]["fpn_channels"],
                   "box_loss": config["det"]["box_loss"], "grid_size": config["det"]["yolo_grid"]}
        options = {key: value for key, value in options.items() if key in accepted}
        model = builder(num_classes=num_classes, in_channels=in_channels, image_size=config["data"]["image_size"],
                        **options)
        # What the auxiliary networks of local methods read (fba.tasks.detection.local).
        model.local_settings = {key: config["det"][key] for key in LOCAL_KEYS}
        return model

    def build_datasets(self, config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        data = config["data"]
        builder = self.dataset_registry().get(data["name"])
        return builder(root=data["root"], download=data["download"], augment=data["augment"],
                       image_size=data["image_size"])

    def collate_fn(self) -> Callable[[list], Any]:
        """Images stacked ``(N, 3, H, W)`` (the square resize makes them equal), targets a list of dicts."""
        from fba.tasks.detection.data import collate_detection

        return collate_detection

    def targets_to(self, targets: Any, device: "torch.device") -> Any:
        from fba.tasks.detection.task import targets_to

        return targets_to(targets, device)

    def synthetic_batch(self, config: Mapping[str, Any], batch_size: int, in_channels: int, input_size: int,
                        num_classes: int, generator: "torch.Generator", device: "torch.device") -> tuple[Any, Any]:
        """Images ``(N, C, S, S)`` in [0, 1] and N target dicts of 1-3 random valid boxes
        (xyxy pixels, sides 10-40% of the image) with labels in ``0..num_classes-1``."""
        import torch

        images = torch.rand(batch_size, in_channels, input_size, input_size, generator=generator).to(device)
        targets = []
        for _ in range(batch_size):
            count = int(torch.randint(1, 4, (), generator=generator))
            size = (0.1 + 0.3 * torch.rand(count, 2, generator=generator)) * input_size
            corner = torch.rand(count, 2, generator=generator) * (input_size - size)
            boxes = torch.cat([corner, corner + size], dim=1)
            labels = torch.randint(0, num_classes, (count,), generator=generator)
            targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
        return images, targets

    def describe_metrics(self, metrics: Mapping[str, Any]) -> str:
        def number(key: str) -> str:
            value = metrics.get(key)
            return "n/a" if value is None else f"{value:.4f}"

        return f"mAP@0.5 {number('map50')}, mAP {number('map')}, mAP@0.75 {number('map75')}"

    def export_metadata(self, config: Mapping[str, Any], info: Any) -> dict[str, str]:
        """What rebuilds the network: classes and image size, and RetinaNet's anchor sizes
        and FPN width (``torchvision_retinanet(depth, num_classes, image_size, anchor_sizes,
        fpn_channels)``) or YOLO's grid."""
        from fba.tasks.detection.models import default_anchor_sizes, default_grid_size

        size = config["data"]["image_size"]
        meta = {"num_classes": str(info.num_classes), "image_size": str(size)}
        if config["model"].startswith("retinanet"):
            meta["anchor_sizes"] = json.dumps(list(config["det"]["anchor_sizes"] or default_anchor_sizes(size)))
            meta["fpn_channels"] = str(config["det"]["fpn_channels"])
        elif config["model"].startswith("yolov1"):
            meta["grid_size"] = str(config["det"]["yolo_grid"] or default_grid_size(size))
        return meta

    def evaluate_run(self, config: Mapping[str, Any], learner: Any, eval_set: Any, device: "torch.device", *,
                     run_dir: Any, images: str | None, out: str | None, info: Any = None
                     ) -> tuple[dict[str, Any], str]:
        """COCO mAP and the per-class VOC AP table on the validation split, or detections drawn.

        With ``images``: every image of that folder with its detections (score at least
        ``det.draw_score``) drawn as ``<out>/<name>.png`` (``out`` defaults to
        ``RUN_DIR/detections/<folder name>``). Without: the metrics over the validation split
        (batches of ``data.eval_batch_size``), and with ``out`` its images drawn there too.
        """
        from pathlib import Path

        from torch.utils.data import DataLoader

        from fba.tasks.detection.data import collate_detection
        from fba.tasks.detection.draw import detect, draw_detections
        from fba.tasks.detection.task import detection_metrics, per_class_table
        from fba.tasks.image_files import read_image_folder, save_image

        size, threshold = config["data"]["image_size"], config["det"]["draw_score"]
        class_names = list(getattr(info, "class_names", None) or [])
        if images:
            folder = Path(out or Path(run_dir) / "detections" / Path(images).resolve().name)
            pictures = read_image_folder(images)
            model = learner.export().to(device)
            found = detect(model, [picture for _, picture in pictures], size, device)
            for (name, picture), detections in zip(pictures, found):
                save_image(draw_detections(picture, detections, class_names, threshold).float() / 255,
                           folder / f"{name}.png")
            shown = sum(int((d["scores"] >= threshold).sum()) for d in found)
            result = {"images": len(pictures), "detections_drawn": shown, "score_threshold": threshold,
                      "out": str(folder)}
            return result, (f"wrote {len(pictures)} PNGs with {shown} detections (score >= {threshold}) to {folder}")
        loader = DataLoader(eval_set, batch_size=config["data"]["eval_batch_size"], collate_fn=collate_detection,
                            num_workers=config["data"]["num_workers"])
        names = list(getattr(eval_set, "class_names", ()) or class_names)
        folder = Path(out) if out else None

        def draw(index: int, image: "torch.Tensor", detections: dict) -> None:
            stem = Path(eval_set.describe(index)).stem if hasattr(eval_set, "describe") else str(index)
            save_image(draw_detections(image, detections, names, threshold).float() / 255, folder / f"{stem}.png")

        predictions, truths, loss = learner.task.predict(learner, loader, device, on_output=draw if folder else None)
        metrics = detection_metrics(predictions, truths, loss)
        rows, table = per_class_table(predictions, truths, names)
        name = config["data"]["name"]
        result = {"dataset": name, **metrics, "per_class": rows}
        text = f"{name} validation: {self.describe_metrics(metrics)}\n{table}"
        if folder:
            result["out"] = str(folder)
            text += f"\n{len(predictions)} PNGs with detections drawn in {folder}"
        return result, text


TASKS.register(DetectionPlugin.name)(DetectionPlugin())
