"""The task-plugin interface: everything the library needs to know about one task.

The build layer, the CLI, the config and the methods never name a task; they ask the task's
plugin, found by name in :data:`fba.tasks.TASKS`. A new task is a folder
``fba/tasks/<name>/`` whose ``plugin.py`` registers a :class:`TaskPlugin` subclass.

A plugin module must stay light: import torch, models and datasets inside the methods, not
at module level, because the config resolves its sections and defaults through the plugins
before anything heavy is needed (``fba list``, ``--help``, config errors).

Methods ask a task for their task-specific parts through :meth:`TaskPlugin.method_part`.
The parts each built-in method asks for, and their signatures:

- ``dgl``: ``"aux"``, ``(ctx: BuildContext, k: int) -> nn.Module``, module k's auxiliary
  network (``(N, C_k, H_k, W_k) -> task output``). Required: DGL refuses a task without it.
- ``fba``: ``"aux_nets"``, ``(method: FBA, ctx: BuildContext) -> list[nn.Module]``, the K-1
  Simple Local Modules; ``"bank"``, ``(method: FBA, ctx: BuildContext) -> bank | None``.
  Both optional: without them FBA builds its task-agnostic SLMs (stage-tail block, light
  fusion, the task's head) and a :class:`~fba.engine.bank.FeatureBank` of
  ``task.summarize`` vectors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from fba.rules import Rule

if TYPE_CHECKING:
    import torch

    from fba.engine.units import UnitModel
    from fba.registry import Registry

#: a part offered to a method: the callable itself, or ``"package.module:attribute"`` so that
#: the module (and torch) is imported only when a learner is built
PartRef = Union[Callable[..., Any], str]


class TaskPlugin:
    """What one task provides. Subclasses set the attributes and override the methods.

    Attributes:
        name: the task's name, the value of the config key ``task``.
        description: one line for listings.
        config_section: the name of the task's own config section (``"sr"``), or None.
        config_defaults: that section's keys and default values. Every config holds every
            task's section, so a run folder's ``config.yaml`` loads whatever its task.
        config_rules: that section's validation rules, keyed by the key inside the section
            (a tuple of choices or a ``check(value) -> expected | None``, see :mod:`fba.rules`).
        task_defaults: what changes when a config names this task (a partial config tree),
            so that ``task=<name>`` alone is a complete, sensible run.
        primary_metric: the key of the evaluation metric that ranks runs (``"top1"``).
        metric_label: an axis label for the primary metric in charts.
        offers: ``method name -> part name -> PartRef``, the task-specific parts this task
            offers each method (see the module docstring for the parts methods ask for).
    """

    name: str = ""
    description: str = ""
    config_section: str | None = None
    config_defaults: Mapping[str, Any] = {}
    config_rules: Mapping[str, Rule] = {}
    task_defaults: Mapping[str, Any] = {}
    primary_metric: str = ""
    metric_label: str = ""
    offers: Mapping[str, Mapping[str, PartRef]] = {}

    # ---- registries -------------------------------------------------------------------------
    def model_registry(self) -> "Registry":
        """Model name -> builder of a :class:`~fba.engine.units.UnitModel`."""
        raise NotImplementedError

    def dataset_registry(self) -> "Registry":
        """Dataset name -> builder of ``(train_set or None, test_set, info)``."""
        raise NotImplementedError

    # ---- the build layer: config -> arguments -> objects ------------------------------------
    def build_task(self, config: Mapping[str, Any]) -> Any:
        """The task object: ``name``, ``loss(output, targets)``, ``summarize(h)``,
        ``evaluate(model, batches, device)``, ``variable_size_eval``."""
        raise NotImplementedError

    def build_model(self, config: Mapping[str, Any], num_classes: int, in_channels: int) -> "UnitModel":
        """The config's ``model`` as units + head, shaped by the data's facts (``num_classes``
        and ``in_channels``) and the task's own section."""
        raise NotImplementedError

    def build_datasets(self, config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        """``(train_set or None, test_set, info)`` for the config's ``data.name``.

        ``info`` has at least ``in_channels`` and ``num_train``; ``num_classes`` where the
        model is sized by it.
        """
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list], Any] | None:
        """How the trainer's DataLoader batches the task's items (None: torch's default)."""
        return None

    def targets_to(self, targets: Any, device: "torch.device") -> Any:
        """A batch's targets on ``device`` (the default: one tensor)."""
        return targets.to(device, non_blocking=True)

    def offline_data_info(self, config: Mapping[str, Any]) -> Any | None:
        """The data info of a run, without loading its dataset, when the task can run its model
        on a folder of images (``fba eval RUN --images``); None when it needs the dataset."""
        return None

    # ---- benchmarks and reports -------------------------------------------------------------
    def synthetic_batch(self, config: Mapping[str, Any], batch_size: int, in_channels: int, input_size: int,
                        num_classes: int, generator: "torch.Generator", device: "torch.device") -> tuple[Any, Any]:
        """Random ``(inputs, targets)`` of the task's training shapes, for ``fba bench``.

        ``inputs`` is ``(batch_size, in_channels, input_size, input_size)``; the targets are
        what :meth:`build_task`'s loss takes. Drawn from ``generator`` (on the CPU, then moved
        to ``device``) so that every method of one benchmark sees the same batch.
        """
        raise NotImplementedError

    def probe_input_size(self, config: Mapping[str, Any]) -> int:
        """The side of the synthetic inputs that ``partition=balanced`` measures the units on
        (default ``data.image_size``)."""
        return int(config["data"]["image_size"])

    def describe_metrics(self, metrics: Mapping[str, Any]) -> str:
        """One human phrase for the task's evaluation metrics (``"test top-1 0.9312"``)."""
        raise NotImplementedError

    def export_metadata(self, config: Mapping[str, Any], info: Any) -> dict[str, str]:
        """Shape facts stored beside an exported model's weights (safetensors metadata, strings)."""
        raise NotImplementedError

    def evaluate_run(self, config: Mapping[str, Any], learner: Any, eval_set: Any, device: "torch.device", *,
                     run_dir: Any, images: str | None, out: str | None, info: Any = None
                     ) -> tuple[dict[str, Any], str]:
        """``fba eval``: evaluate a trained learner and return ``(result, human sentence)``.

        Args:
            eval_set: the run's test or validation split (None when ``images`` is given and
                :meth:`offline_data_info` made loading it unnecessary).
            run_dir: the run folder (a default place for written outputs).
            info: the data facts the model was built from (``num_classes``, ``class_names``
                where the dataset has them), saved with the run's weights.
            images, out: ``--images FOLDER`` and ``--out FOLDER``; a task that writes no
                images raises :class:`~fba.errors.ConfigError` when they are given.
        """
        raise NotImplementedError

    # ---- what the task offers each method ---------------------------------------------------
    def method_part(self, method: str, part: str) -> Callable[..., Any] | None:
        """The task's ``part`` for ``method`` (e.g. DGL's ``"aux"`` builder), or None."""
        ref = self.offers.get(method, {}).get(part)
        if ref is None or callable(ref):
            return ref
        module, _, attribute = ref.partition(":")
        return getattr(importlib.import_module(module), attribute)
