"""Tasks: models as units + head, losses, data and metrics for each vision task.

A task is a plugin (:class:`~fba.tasks.plugin.TaskPlugin`): :data:`TASKS` maps its name to
what it provides, so that the build layer, the CLI, the config and the methods name no
task. Each subpackage ``fba/tasks/<name>/`` with a ``plugin`` module registers itself the
first time the registry is asked; nothing here imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Any, Callable

from fba.registry import Registry
from fba.tasks.plugin import TaskPlugin

TASKS: Registry[TaskPlugin] = Registry("task")

#: the task of a config that names none (``fba train`` with no argument)
DEFAULT_TASK = "classification"

_discovered = False


def _register_builtin() -> None:
    # Lazy: importing fba (or fba.config) must not import every task's plugin module.
    global _discovered
    if _discovered:
        return
    _discovered = True
    for package in pkgutil.iter_modules(__path__):
        if package.ispkg and importlib.util.find_spec(f"{__name__}.{package.name}.plugin") is not None:
            importlib.import_module(f"{__name__}.{package.name}.plugin")


def get_task(name: str) -> TaskPlugin:
    """The plugin of task ``name``; an unknown name fails with the valid choices listed."""
    _register_builtin()
    return TASKS.get(name)


def find_task(name: str) -> TaskPlugin | None:
    """The plugin of task ``name``, or None when no task has that name."""
    _register_builtin()
    return TASKS.get(name) if name in TASKS else None


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    _register_builtin()
    return TASKS.names()


def method_part(task: str, method: str, part: str) -> Callable[..., Any] | None:
    """The ``part`` that task ``task`` offers ``method``; None for an unknown task or no offer."""
    plugin = find_task(task)
    return plugin.method_part(method, part) if plugin is not None else None


def tasks_offering(method: str, part: str) -> list[str]:
    """Names of the tasks that offer ``method`` its ``part`` (for error messages)."""
    return [name for name in list_tasks() if part in get_task(name).offers.get(method, {})]
