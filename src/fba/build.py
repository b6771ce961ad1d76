"""The one layer that turns a config into objects. Modules never see a config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from fba.config import resolve_config
from fba.errors import ConfigError, FBAError



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device': {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"config key 'device': {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def model_registry(task: str):
    if task == "super_resolution":
        from fba.tasks.super_resolution.models import SR_MODELS

        return SR_MODELS
    from fba.tasks.classification.models import MODELS

    return MODELS


def build_model(config: Mapping[str, Any], num_classes: int = 10, in_channels: int = 3):
    """The task's model as units + head (classification: sized by classes; SR: by scale)."""
    builder = model_registry(config["task"]).get(config["model"])
    if config["task"] == "super_resolution":
        return builder(scale=config["sr"]["scale"], in_channels=in_channels)
    return builder(num_classes=num_classes, in_channels=in_channels)


def build_task(config: Mapping[str, Any]):
    if config["task"] == "super_resolution":
        from fba.tasks.super_resolution.task import SuperResolutionTask

        return SuperResolutionTask(scale=config["sr"]["scale"], y_channel=config["sr"]["y_channel"])
    from fba.tasks.classification.task import ClassificationTask

    return ClassificationTask()


def build_method(config: Mapping[str, Any]):
    from fba.methods import get_method

    cls = get_method(config["method"])
    if cls.name == "fba":
        opts, bank = config["fba"], config["fba"]["bank"]
        return cls(reduction=opts["reduction"], share_head=opts["share_head"], bank_source=bank["source"],
                   bank_usage=bank["usage"], fusion=bank["fusion"], target_weight=bank["target_weight"],
                   bank_storage=bank["storage"], bank_dtype=bank["dtype"])
    if cls.name == "predsim":
        return cls(beta=config["predsim"]["beta"])
    if cls.name == "infopro":
        opts = config["infopro"]
        return cls(mode=opts["mode"], weights_first=tuple(opts["weights_first"]), weights_last=tuple(opts["weights_last"]),
                   temperature=opts["temperature"])
    if cls.name == "auglocal":
        return cls(depth=config["auglocal"]["depth"], tau=config["auglocal"]["tau"])
    return cls()


def optimizer_factory(optim: Mapping[str, Any]):
    def make(params):
        params = list(params)
        if optim["name"] == "sgd":
            return torch.optim.SGD(params, lr=optim["lr"], momentum=optim["momentum"],
                                   nesterov=optim["nesterov"] and optim["momentum"] > 0, weight_decay=optim["weight_decay"])
        cls = torch.optim.Adam if optim["name"] == "adam" else torch.optim.AdamW
        return cls(params, lr=optim["lr"], weight_decay=optim["weight_decay"])

    return make


def scheduler_factory(optim: Mapping[str, Any], total_steps: int | None, steps_per_epoch: int | None):
    """Per-step LR: linear warm-up over ``warmup_epochs``, then cosine to zero, constant, or step decay."""
    if not total_steps:
        return None
    warmup = int(round(optim["warmup_epochs"] * (steps_per_epoch or 0)))
    schedule = optim["schedule"]
    decay_every = max(1, int(round(optim["decay_every_epochs"] * (steps_per_epoch or 1))))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "step":  # EDSR: multiply by decay_factor every decay_every_epochs
            return optim["decay_factor"] ** (step // decay_every)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def build_learner(config: str | Path | Mapping[str, Any] | None = None, /, *, num_classes: int | None = None,
                  in_channels: int | None = None, num_samples: int | None = None,
                  total_steps: int | None = None, steps_per_epoch: int | None = None, **kwargs: Any):
    """Build a :class:`~fba.engine.learner.LocalLearner` from a config file, dict or keywords.

    Examples:
        >>> learner = build_learner(model="resnet32", method="fba", K=16, num_classes=10)
        >>> learner = build_learner("configs/cifar10_fba.yaml", num_classes=10)

    Args:
        config: YAML path or (partial) config dict; keywords override it.
        num_classes, in_channels: model shape (defaults 10 and 3).
        num_samples: training-set size, needed by the long-term bank.
        total_steps, steps_per_epoch: enable the per-step LR schedule.
        **kwargs: config keys, e.g. ``method="fba"``, ``K=4``, ``optim={"lr": 0.05}``,
            ``**{"fba.bank.source": "longterm"}``.
    """
    # Top-level keys pass as is; nested ones as dotted keys or section dicts (fba={...}).
    cfg = resolve_config(config, kwargs)
    # The initial weights depend on the config's seed alone; the caller's RNG stream is left
    # as it was (building a learner must not change what the caller draws next).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg["seed"])
        return _build_learner(cfg, num_classes, in_channels, num_samples, total_steps, steps_per_epoch)


def _build_learner(cfg: dict[str, Any], num_classes: int | None, in_channels: int | None, num_samples: int | None,
                   total_steps: int | None, steps_per_epoch: int | None):
    from fba.engine.learner import LocalLearner
    from fba.engine.partition import partition_units
    from fba.methods.base import BuildContext

    device = resolve_device(cfg["device"])
    if cfg["precision"] == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'precision': fp16 needs CUDA (its grad scaler); use bf16 or fp32 on CPU")
    task = build_task(cfg)
    method = build_method(cfg)
    model = build_model(cfg, num_classes or 10, in_channels or 3)
    if cfg["init_from"]:
        from fba.training.checkpoint import init_from_checkpoint

        init_from_checkpoint(model.plain, cfg["init_from"])
    K = 1 if method.end_to_end else cfg["K"]
    groups = partition_units(model.specs, K, cfg["partition"] if not method.end_to_end else "count",
                             None if method.end_to_end else cfg["cuts"])
    if model.set_partition is not None:
        model.set_partition(groups)
    ctx = BuildContext(model=model, groups=groups, task=task, num_samples=num_samples, extra={"device": device})
    try:
        aux_nets = method.build_aux_nets(ctx)
        bank = method.build_bank(ctx)
    except ValueError as error:
        raise FBAError(f"method {cfg['method']!r} on {cfg['model']!r}: {error}") from None
    method.bind(ctx)
    step_mode = cfg["optim"]["step"]
    if step_mode == "auto":
        step_mode = method.default_step
    modules = [method.module_from_units([model.units[i] for i in group]) for group in groups]
    model.plain.to(device)
    for aux in aux_nets:
        aux.to(device)
    try:
        learner = LocalLearner(
            plain=model.plain, local_modules=modules, head=model.head, aux_nets=aux_nets, method=method, task=task,
            make_optimizer=optimizer_factory(cfg["optim"]),
            make_scheduler=scheduler_factory(cfg["optim"], total_steps, steps_per_epoch),
            step_mode=step_mode, bank=bank, precision=cfg["precision"],
        ).to(device)
    except ValueError as error:
        raise FBAError(f"method {cfg['method']!r} on {cfg['model']!r}: {error}") from None
    learner.config = cfg
    learner.groups = groups
    return learner


def dataset_registry(task: str):
    if task == "super_resolution":
        from fba.tasks.super_resolution.data import SR_DATASETS

        return SR_DATASETS
    from fba.tasks.classification.data import DATASETS

    return DATASETS


def build_datasets(cfg: Mapping[str, Any]):
    """``(train_set, test_set, info)`` for the config's task and ``data.name``."""
    data = cfg["data"]
    builder = dataset_registry(cfg["task"]).get(data["name"])
    if cfg["task"] == "super_resolution":
        sr = cfg["sr"]
        return builder(root=data["root"], scale=sr["scale"], patch_size=sr["patch_size"], augment=data["augment"],
                       patches_per_epoch=sr["patches_per_epoch"], eval_crop=sr["eval_crop"], download=data["download"])
    return builder(root=data["root"], download=data["download"], augment=data["augment"],
                   per_class_train=data["per_class_train"], per_class_test=data["per_class_test"],
                   image_size=data["image_size"])
