"""fba: supervised local learning with Feature Bank Augmented auxiliary networks.

The heavy parts (torch models, datasets, the trainer) load on first use, so ``import fba``
stays light.

    >>> import fba
    >>> learner = fba.build_learner(model="resnet32", method="fba", K=16, num_classes=10)
    >>> stats = learner.train_step(images, labels)
    >>> model = learner.export()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["build_learner", "list_models", "list_methods", "list_datasets", "list_tasks", "bench", "metrics", "FBAError",
           "__version__"]

from fba.errors import FBAError


def build_learner(*args: Any, **kwargs: Any):
    from fba.build import build_learner as _build

    return _build(*args, **kwargs)


build_learner.__doc__ = "Build a LocalLearner; see :func:`fba.build.build_learner`."


def list_tasks() -> list[str]:
    """Registered task names (``classification``, ``super_resolution``, ...)."""
    from fba.tasks import list_tasks as _list

    return _list()


def list_models(task: str | None = None) -> list[str]:
    """Registered model names: every task's, or one task's (``classification``, ``super_resolution``)."""
    from fba.tasks import get_task

    return [name for t in ([task] if task else list_tasks()) for name in get_task(t).model_registry().names()]


def list_methods() -> list[str]:
    from fba.methods import list_methods as _list

    return _list()


def list_datasets(task: str | None = None) -> list[str]:
    """Registered dataset names: every task's, or one task's."""
    from fba.tasks import get_task

    return [name for t in ([task] if task else list_tasks()) for name in get_task(t).dataset_registry().names()]


def __getattr__(name: str) -> Any:
    if name in ("bench", "metrics"):
        import importlib

        return importlib.import_module(f"fba.{name}")
    raise AttributeError(f"module 'fba' has no attribute {name!r}")
