"""The super-resolution task as a plugin: what build, CLI, config and methods ask of it.

Light at import (no torch): models, data and the task object load inside the methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from fba.rules import boolean, optional_positive_int, positive_int
from fba.tasks import TASKS
from fba.tasks.plugin import TaskPlugin

if TYPE_CHECKING:
    import torch

    from fba.engine.units import UnitModel
    from fba.registry import Registry


class SuperResolutionPlugin(TaskPlugin):
    """EDSR on DIV2K, benchmark folders and built-in photos; L1 loss; PSNR/SSIM on Y.

    Its config section is ``sr`` (scale, patch size, patches per epoch, evaluation crop,
    metrics on Y or RGB).
    """

    name = "super_resolution"
    description = "super-resolution: EDSR x2/x3/x4, L1 loss, PSNR/SSIM on the Y channel"
    config_section = "sr"
    config_defaults = {
        "scale": 2,
        "patch_size": 48,
        "patches_per_epoch": 1600,
        "eval_crop": None,
        "y_channel": True,
    }
    config_rules = {
        "scale": (2, 3, 4),
        "patch_size": positive_int,
        "patches_per_epoch": positive_int,
        "eval_crop": optional_positive_int,
        "y_channel": boolean,
    }
    # A user who writes only ``task=super_resolution`` gets a complete, sensible run (EDSR
    # baseline x2, FBA, photos-sr).
    task_defaults = {
        "model": "edsr_baseline",
        "K": 6,
        "data": {"name": "photos-sr", "batch_size": 16, "eval_batch_size": 1, "augment": True},
        # EDSR's recipe is Adam at 1e-4, halved every 200 epochs of 1,000 steps; the built-in
        # run is short, so it uses a higher rate with a cosine decay.
        "optim": {"name": "adam", "lr": 5e-4, "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0.0},
        # 30 epochs x 25 steps of 16 32x32 LR patches: about 12 minutes on 2 CPU cores.
        "train": {"epochs": 30},
        "sr": {"patch_size": 32, "patches_per_epoch": 400, "eval_crop": 256},
        # The SR bank is the early full-resolution map of the current batch (paper Fig. 4).
        # Half-width SLM tails: 0.42x BP's memory instead of 0.51x at 48x48, for 0.09 dB
        # (docs/super_resolution.md, ablation).
        "fba": {"reduction": 2, "bank": {"source": "inpass", "usage": "input"}},
    }
    primary_metric = "psnr"
    metric_label = "validation PSNR (dB)"
    offers = {
        "fba": {"aux_nets": "fba.tasks.super_resolution.local:build_fba_slms",
                "bank": "fba.tasks.super_resolution.local:build_fba_bank"},
        "dgl": {"aux": "fba.tasks.super_resolution.local:build_dgl_aux"},
    }

    def model_registry(self) -> "Registry":
        from fba.tasks.super_resolution.models import SR_MODELS

        return SR_MODELS

    def dataset_registry(self) -> "Registry":
        from fba.tasks.super_resolution.data import SR_DATASETS

        return SR_DATASETS

    def build_task(self, config: Mapping[str, Any]) -> Any:
        from fba.tasks.super_resolution.task import SuperResolutionTask

        return SuperResolutionTask(scale=config["sr"]["scale"], y_channel=config["sr"]["y_channel"])

    def build_model(self, config: Mapping[str, Any], num_classes: int, in_channels: int) -> "UnitModel":
        """Sized by the scale; ``num_classes`` does not apply."""
        return self.model_registry().get(config["model"])(scale=config["sr"]["scale"], in_channels=in_channels)

    def build_datasets(self, config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        data, sr = config["data"], config["sr"]
        builder = self.dataset_registry().get(data["name"])
        return builder(root=data["root"], scale=sr["scale"], patch_size=sr["patch_size"], augment=data["augment"],
                       patches_per_epoch=sr["patches_per_epoch"], eval_crop=sr["eval_crop"], download=data["download"])

    def offline_data_info(self, config: Mapping[str, Any]) -> Any | None:
        """Super-resolving a folder of images needs no dataset: the scale is in the config."""
        from fba.tasks.super_resolution.data import SRDataInfo

        return SRDataInfo(scale=config["sr"]["scale"], in_channels=3, num_train=0, num_train_images=0, num_val_images=0)

    def probe_input_size(self, config: Mapping[str, Any]) -> int:
        """The LR patch side (``sr.patch_size``): the model's input size in training."""
        return int(config["sr"]["patch_size"])

    def synthetic_batch(self, config: Mapping[str, Any], batch_size: int, in_channels: int, input_size: int,
                        num_classes: int, generator: "torch.Generator", device: "torch.device") -> tuple[Any, Any]:
        """LR patches ``(N, C, S, S)`` and HR targets ``(N, C, S*scale, S*scale)``, both in [0, 1]."""
        import torch

        high = input_size * config["sr"]["scale"]
        lr = torch.rand(batch_size, in_channels, input_size, input_size, generator=generator).to(device)
        hr = torch.rand(batch_size, in_channels, high, high, generator=generator).to(device)
        return lr, hr

    def describe_metrics(self, metrics: Mapping[str, Any]) -> str:
        return (f"PSNR {metrics['psnr']:.2f} dB (bicubic {metrics['psnr_bicubic']:.2f}), "
                f"SSIM {metrics['ssim']:.4f}")

    def export_metadata(self, config: Mapping[str, Any], info: Any) -> dict[str, str]:
        return {"scale": str(config["sr"]["scale"])}

    def evaluate_run(self, config: Mapping[str, Any], learner: Any, eval_set: Any, device: "torch.device", *,
                     run_dir: Any, images: str | None, out: str | None, info: Any = None
                     ) -> tuple[dict[str, Any], str]:
        """Metrics on the run's validation set, or super-resolved PNGs of a folder of LR images.

        With ``images``: every image of that folder, upscaled, as ``<out>/<name>.png``
        (``out`` defaults to ``RUN_DIR/sr/<folder name>``). Without: PSNR/SSIM over the
        validation images, one at a time, and their outputs written to ``out`` if given.
        """
        import torch
        from torch.utils.data import DataLoader

        from fba.tasks.image_files import read_image_folder, save_image

        scale, dataset = config["sr"]["scale"], config["data"]["name"]
        model = learner.export().to(device)
        if images:
            folder = Path(out or Path(run_dir) / "sr" / Path(images).resolve().name)
            pictures = read_image_folder(images)
            with torch.no_grad():
                for name, lr in pictures:
                    save_image(model(lr[None].to(device))[0].clamp(0, 1), folder / f"{name}.png")
            result = {"images": len(pictures), "out": str(folder), "scale": scale}
            return result, f"wrote {len(pictures)} x{scale} super-resolved PNGs to {folder}"
        folder = Path(out) if out else None
        names = getattr(eval_set, "names", None)

        def save(index: int, sr: torch.Tensor) -> None:
            save_image(sr, folder / f"{names[index] if names else index}.png")

        loader = DataLoader(eval_set, batch_size=1, num_workers=config["data"]["num_workers"])
        metrics = learner.task.evaluate(model, loader, device, on_output=save if folder else None)
        result = {"dataset": dataset, "scale": scale, **metrics, **({"out": str(folder)} if folder else {})}
        return result, (f"{dataset} x{scale} validation: {self.describe_metrics(metrics)}"
                        + (f"; PNGs in {folder}" if folder else ""))


TASKS.register(SuperResolutionPlugin.name)(SuperResolutionPlugin())
