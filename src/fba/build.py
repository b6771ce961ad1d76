"""The one layer that turns a config into objects. Modules never see a config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from fba.config import resolve_config
from fba.engine.checkpointing import CheckpointedUnits, checkpoint_batch_chunks
from fba.errors import ConfigError, FBAError
from fba.tasks import get_task


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
    """The model registry of task ``task`` (name -> builder of a UnitModel)."""
    return get_task(task).model_registry()


def build_model(config: Mapping[str, Any], num_classes: int = 10, in_channels: int = 3):
    """The config's model as units + head, shaped by its task (classes, scale, ...)."""
    return get_task(config["task"]).build_model(config, num_classes, in_channels)


def build_task(config: Mapping[str, Any]):
    """The task object (loss, evaluation, bank summary) of the config's task."""
    return get_task(config["task"]).build_task(config)


def build_method(config: Mapping[str, Any]):
    """The config's method, built from its own config section."""
    from fba.methods import get_method

    return get_method(config["method"]).from_config(config)


def optimizer_factory(optim: Mapping[str, Any]):
    """``make(params)``: the run's optimizer over a parameter list, or over parameter groups,
    where a group's ``lr_scale`` multiplies ``optim.lr`` (the auxiliary networks' groups)."""
    def make(params):
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [{**group, "lr": optim["lr"] * group.get("lr_scale", 1.0)} for group in params]
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
                  total_steps: int | None = None, steps_per_epoch: int | None = None, input_size: int | None = None,
                  **kwargs: Any):
    """Build a :class:`~fba.engine.learner.LocalLearner` from a config file, dict or keywords.

    Examples:
        >>> learner = build_learner(model="resnet32", method="fba", K=16, num_classes=10)
        >>> learner = build_learner("configs/cifar10_fba.yaml", num_classes=10)

    Args:
        config: YAML path or (partial) config dict; keywords override it.
        num_classes, in_channels: model shape (defaults 10 and 3).
        num_samples: training-set size, needed by the long-term bank.
        total_steps, steps_per_epoch: enable the per-step LR schedule.
        input_size: the side of the training inputs, which ``partition=balanced`` measures the
            units at (default: the task's size from the config, ``TaskPlugin.probe_input_size``;
            classification's ``data.image_size`` is ImageNet's, so give CIFAR's 32 here).
        **kwargs: config keys, e.g. ``method="fba"``, ``K=4``, ``optim={"lr": 0.05}``,
            ``**{"fba.bank.source": "longterm"}``.
    """
    # Top-level keys pass as is; nested ones as dotted keys or section dicts (fba={...}).
    cfg = resolve_config(config, kwargs)
    # The initial weights depend on the config's seed alone; the caller's RNG stream is left
    # as it was (building a learner must not change what the caller draws next).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg["seed"])
        return _build_learner(cfg, num_classes, in_channels, num_samples, total_steps, steps_per_epoch,
                              input_size=input_size)


def build_inference_learner(config: Mapping[str, Any], num_classes: int | None = None, in_channels: int | None = None):
    """The config's network for inference (export, evaluation): one module and the head.

    It builds neither auxiliary networks nor a bank, whatever the config's method, and reads
    no ``init_from``: load the trained weights with ``learner.load_model_weights``.
    """
    from fba.methods.base import InferenceOnly

    cfg = resolve_config(dict(config), {"init_from": None})
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg["seed"])
        return _build_learner(cfg, num_classes, in_channels, None, None, None, method=InferenceOnly())


def _build_learner(cfg: dict[str, Any], num_classes: int | None, in_channels: int | None, num_samples: int | None,
                   total_steps: int | None, steps_per_epoch: int | None, method: Any = None,
                   input_size: int | None = None):
    from fba.engine.learner import LocalLearner
    from fba.engine.partition import partition_units
    from fba.methods.base import BuildContext

    device = resolve_device(cfg["device"])
    if cfg["precision"] == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'precision': fp16 needs CUDA (its grad scaler); use bf16 or fp32 on CPU")
    task = build_task(cfg)
    method = method or build_method(cfg)
    model = build_model(cfg, num_classes or 10, in_channels or 3)
    if cfg["init_from"]:
        from fba.training.checkpoint import init_from_checkpoint

        init_from_checkpoint(model.plain, cfg["init_from"])
    K = 1 if method.end_to_end else cfg["K"]
    mode = cfg["partition"] if not method.end_to_end else "count"

    # Called by the partitioner only once it has accepted K and the cuts and has more than one
    # partition to choose from: the probe and the checkpoint list's check wait for a valid K.
    def costs():
        return measure_partition_costs(cfg, len(model.specs), num_classes or 10, in_channels or 3,
                                       num_samples, device, input_size)

    def balance_checkpointed():
        return frozenset(checkpointed_modules(cfg["checkpoint"], method, K))

    groups = partition_units(model.specs, K, mode, None if method.end_to_end else cfg["cuts"], costs=costs,
                             checkpointed=balance_checkpointed)
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
    # checkpoint=true: each module keeps only its units' inputs and recomputes the rest in its
    # backward, so a module's activations shrink to its unit boundaries plus one unit's.
    checkpointed = checkpointed_modules(cfg["checkpoint"], method, len(groups))
    modules = [CheckpointedUnits(*[model.units[i] for i in group]) if k in checkpointed
               else method.module_from_units([model.units[i] for i in group]) for k, group in enumerate(groups)]
    # and the batch-chunkable parts of those modules (a conv-BatchNorm stem, an SR tail), in
    # their auxiliary networks too
    chunks = cfg["checkpoint_chunks"]
    for k in checkpointed:
        for i in groups[k]:
            checkpoint_batch_chunks(model.units[i], chunks)
    if len(groups) - 1 in checkpointed:
        checkpoint_batch_chunks(model.head, chunks)
    for k, aux in enumerate(aux_nets):
        if k in checkpointed:
            checkpoint_batch_chunks(aux, chunks)
    model.plain.to(device)
    for aux in aux_nets:
        aux.to(device)
    try:
        learner = LocalLearner(
            plain=model.plain, local_modules=modules, head=model.head, aux_nets=aux_nets, method=method, task=task,
            make_optimizer=optimizer_factory(cfg["optim"]),
            make_scheduler=scheduler_factory(cfg["optim"], total_steps, steps_per_epoch),
            step_mode=step_mode, bank=bank, precision=cfg["precision"], aux_lr_scale=cfg["optim"]["aux_lr_scale"],
        ).to(device)
    except ValueError as error:
        raise FBAError(f"method {cfg['method']!r} on {cfg['model']!r}: {error}") from None
    learner.config = cfg
    learner.groups = groups
    # State that crosses module boundaries outside the activations (EDSR's global skip):
    # modules in different processes would not see it.
    learner.shares_state_across_units = model.set_partition is not None
    return learner


def measure_partition_costs(cfg: dict[str, Any], num_units: int, num_classes: int, in_channels: int,
                            num_samples: int | None, device: torch.device, input_size: int | None = None):
    """Each unit's activation bytes at the run's batch (``data.batch_size``), and its
    auxiliary network's weights and state, for ``partition=balanced``.

    A probe learner of the config's model and method with one unit per module (no
    checkpointing) takes one synthetic batch of 2 at ``input_size`` (default: the task's probe
    size, ``TaskPlugin.probe_input_size``). It draws from its own seeded RNG stream, so the real
    learner's initial weights are those of any other partition.
    """
    from fba.engine.balance import measure_unit_activation_bytes

    probe_cfg = {**cfg, "K": num_units, "partition": "count", "cuts": None, "checkpoint": False, "init_from": None}
    plugin = get_task(cfg["task"])
    probe_batch = 2
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(cfg["seed"])
        # A long-term bank's table need not hold the dataset: the probe reads only its batch.
        probe = _build_learner(probe_cfg, num_classes, in_channels, probe_batch if num_samples else None, None, None)
        generator = torch.Generator().manual_seed(cfg["seed"])
        inputs, targets = plugin.synthetic_batch(probe_cfg, probe_batch, in_channels,
                                                 input_size or plugin.probe_input_size(cfg),
                                                 num_classes, generator, device)
        indices = torch.arange(probe_batch, device=device) if num_samples else None
        costs = measure_unit_activation_bytes(probe, inputs, targets, indices, cfg["checkpoint_chunks"])
    return costs.at_batch(cfg["data"]["batch_size"] / probe_batch)


def checkpointed_modules(checkpoint: bool | list[int], method: Any, num_modules: int) -> set[int]:
    """The local modules whose units run under activation checkpointing.

    ``checkpoint=true`` (or a method that checkpoints by definition, ``bp_checkpoint``): all.
    A list names local modules; end-to-end methods ignore it, since their one "module" is
    the whole network (``bp_checkpoint`` is BP checkpointed).
    """
    if checkpoint is True or method.checkpoints_activations:
        return set(range(num_modules))
    if not checkpoint or method.end_to_end:
        return set()
    missing = sorted(k for k in checkpoint if k >= num_modules)
    if missing:
        raise FBAError(f"checkpoint={list(checkpoint)}: module {missing[0]} does not exist, "
                       f"the {num_modules} local modules are 0..{num_modules - 1}")
    return set(checkpoint)


def dataset_registry(task: str):
    """The dataset registry of task ``task`` (name -> builder of ``(train, test, info)``)."""
    return get_task(task).dataset_registry()


def build_datasets(cfg: Mapping[str, Any]):
    """``(train_set, test_set, info)`` for the config's task and ``data.name``."""
    return get_task(cfg["task"]).build_datasets(cfg)
