"""The protocol every training method implements (one file per method in this package)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from torch import Tensor, nn

from fba.engine.bank import FeatureBank
from fba.engine.units import UnitModel


class Task(Protocol):
    """What the engine needs from a task (classification, detection, super-resolution)."""

    name: str

    def loss(self, output: Any, targets: Any) -> Tensor: ...

    def summarize(self, h: Tensor) -> Tensor:
        """Compact, detached-friendly summary of a feature map for the bank."""
        ...


@dataclass
class BuildContext:
    """Everything a method needs to build its auxiliary networks.

    Attributes:
        model: the backbone as units + head.
        groups: unit indices of each of the K modules.
        task: the task (loss, bank summary).
        num_samples: training-set size, for per-sample (long-term) banks.
    """

    model: UnitModel
    groups: list[list[int]]
    task: Task
    num_samples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def K(self) -> int:
        return len(self.groups)

    def last_spec(self, k: int):
        """Shape spec of module k's output (its last unit's)."""
        return self.model.specs[self.groups[k][-1]]

    @property
    def module_channels(self) -> list[int]:
        return [self.last_spec(k).out_channels for k in range(self.K)]

    @property
    def module_stages(self) -> list[int]:
        return [self.last_spec(k).stage for k in range(self.K)]

    def task_part(self, method: str, part: str) -> Callable[..., Any] | None:
        """The task-specific ``part`` the task offers ``method`` (see :mod:`fba.tasks.plugin`),
        or None when the task offers none (or is not a registered task)."""
        from fba.tasks import method_part

        return method_part(self.task.name, method, part)


class LocalMethod:
    """Base class: K modules as plain ``nn.Sequential`` chains, no auxiliary networks.

    Subclasses override :meth:`build_aux_nets` / :meth:`local_loss` (local methods) or
    :meth:`module_from_units` (e.g. activation checkpointing).
    """

    name: str = "base"
    #: "global" (one optimizer step after all K backwards) or "per_module" (a step right
    #: after each module's backward, which also frees that module's gradients).
    default_step: str = "global"
    #: methods that are end-to-end by definition force K=1.
    end_to_end: bool = False
    #: methods that checkpoint activations by definition (as ``checkpoint=true`` does for any)
    checkpoints_activations: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LocalMethod":
        """The method as the resolved ``config`` asks for it; a method with options reads them
        from its own section (``config[cls.name]``). The base has no options."""
        return cls()

    def module_from_units(self, units: Sequence[nn.Module]) -> nn.Module:
        return nn.Sequential(*units)

    def build_aux_nets(self, ctx: BuildContext) -> list[nn.Module]:
        """One auxiliary network per module except the last (which uses the task head)."""
        return []

    def build_bank(self, ctx: BuildContext) -> FeatureBank | None:
        return None

    def bind(self, ctx: BuildContext) -> None:
        """Called once before training; keeps what :meth:`local_loss` needs."""
        self.task = ctx.task

    def begin_step(self, inputs: Tensor, targets: Any) -> None:
        """Called at the start of every training step, before module 0 runs.

        Methods whose local losses need the step's inputs (e.g. InfoPro's reconstruction of
        the image) keep a detached reference here; the default keeps nothing.
        """

    def local_loss(self, k: int, aux: nn.Module, h: Tensor, targets: Any, bank: FeatureBank | None) -> Tensor:
        """Loss of module k (k < K-1) from its output ``h`` (attached to module k's graph)."""
        return self.task.loss(aux(h), targets)


class InferenceOnly(LocalMethod):
    """The trained network as inference uses it: the whole backbone as one module, then the head.

    No auxiliary network and no bank: inference never uses them, and a long-term bank would
    be sized to a training set that an exported or evaluated run may no longer have. Not a
    training method (it is not registered); :func:`fba.build.build_inference_learner` uses it.
    """

    name = "inference"
    end_to_end = True
