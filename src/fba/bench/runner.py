"""Side-by-side measurement of methods on one model and input shape."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from fba.bench.memory import ModuleMarker, peak_memory
from fba.build import build_learner, resolve_device
from fba.tasks import get_task


def _synthetic_batch(cfg: Mapping[str, Any], batch_size: int, in_channels: int, input_size: int, num_classes: int,
                     num_samples: int, device: torch.device):
    """Random inputs and targets of the task's shapes (its plugin's), and dataset indices ``(N,)``.

    Seeded by the config, so every method of one benchmark trains on the same batch.
    """
    generator = torch.Generator().manual_seed(cfg["seed"])
    inputs, targets = get_task(cfg["task"]).synthetic_batch(cfg, batch_size, in_channels, input_size, num_classes,
                                                            generator, device)
    # A copy, not a view: a view would keep (and the tracker count) the whole permutation.
    indices = torch.randperm(num_samples, generator=generator)[:batch_size].clone()
    return inputs, targets, indices


#: row options: ``fba+checkpoint`` is ``fba`` with ``checkpoint=true``; ``fba+ddp`` and
#: ``fba+pipeline`` run it in 2 processes (:mod:`fba.bench.multiprocess`); ``fba+KEY=VALUE``
#: overrides one config key for that row only (``fba+checkpoint=[0]``)
ROW_OPTIONS: dict[str, dict[str, Any]] = {"checkpoint": {"checkpoint": True}}


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any], str | None]:
    """``"fba+checkpoint+pipeline"`` -> ``("fba", {"checkpoint": True}, "pipeline")``;
    ``"fba+checkpoint=[0]"`` -> ``("fba", {"checkpoint": [0]}, None)``."""
    from fba.bench.multiprocess import MODES
    from fba.config import parse_override
    from fba.errors import ConfigError

    name, *options = spec.split("+")
    overrides: dict[str, Any] = {}
    mode = None
    for option in options:
        if option in MODES and mode is None:
            mode = option
        elif option in ROW_OPTIONS:
            overrides.update(ROW_OPTIONS[option])
        elif "=" in option:
            key, value = parse_override(option)
            overrides[key] = value
        else:
            raise ConfigError(f"--methods {spec!r}: unknown row option {option!r} "
                              f"(known: {', '.join([*ROW_OPTIONS, *MODES])}, KEY=VALUE, one mode per row)")
    return name, overrides, mode


def _learner(cfg: Mapping[str, Any], spec: str, num_classes: int, in_channels: int, num_samples: int):
    method, overrides, _ = parse_method_spec(spec)
    return build_learner(dict(cfg), method=method, num_classes=num_classes, in_channels=in_channels,
                         num_samples=num_samples, **overrides)


def _distributed_row(cfg, spec: str, what: str, **measure: Any) -> dict[str, Any] | None:
    """The row of a multi-process spec (``fba+ddp``), or None for a single-process one."""
    from fba.bench.multiprocess import measure_distributed

    method, overrides, mode = parse_method_spec(spec)
    if mode is None:
        return None
    row = measure_distributed(cfg, method, overrides, mode, what, **measure)
    from fba.methods import get_method

    return {"method": spec, "model": cfg["model"], "K": 1 if get_method(method).end_to_end else cfg["K"],
            "batch_size": measure["batch_size"], "input_size": measure["input_size"], **row}


def measure_memory(cfg: Mapping[str, Any], methods: Sequence[str], batch_size: int, input_size: int,
                   in_channels: int = 3, num_classes: int = 10, steps: int = 2, num_samples: int = 50_000,
                   progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """Peak training memory of each method over ``steps`` training steps, with a breakdown.

    The first step allocates gradients and optimizer state, so two steps capture the steady
    state. Rows carry ``peak_bytes``, ``params``, ``grads``, ``optimizer``, ``bank``,
    ``activations``, ``peak_module`` (the index of the local module running at the peak,
    counting its backward and step) and ``ratio_to_bp`` (when ``bp`` is among the methods).
    """
    device = resolve_device(cfg["device"])
    rows = []
    for method in methods:
        progress(f"memory: {method} ...")
        row = _distributed_row(cfg, method, "memory", batch_size=batch_size, input_size=input_size,
                               in_channels=in_channels, num_classes=num_classes, num_samples=num_samples, steps=steps)
        if row is not None:
            rows.append(row)
            continue
        learner = _learner(cfg, method, num_classes, in_channels, num_samples)
        images, labels, indices = _synthetic_batch(cfg, batch_size, in_channels, input_size, num_classes, num_samples, device)
        bank = learner.bank
        categories = {
            "params": lambda: [*learner.parameters(), *learner.buffers()],
            "grads": lambda: [p.grad for p in learner.parameters() if p.grad is not None],
            "optimizer": lambda: [t for opt in learner.optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)],
            "bank": lambda: bank.tensors() if bank is not None else [],
        }
        existing = [images, labels, indices, *learner.parameters(), *learner.buffers(), *categories["bank"]()]
        marker = ModuleMarker(learner.local_modules, device)
        result = peak_memory(lambda: [learner.train_step(images, labels, indices) for _ in range(steps)],
                             device=device, existing=existing, categories=categories, marker=marker)
        marker.remove()
        row = {"method": method, "model": cfg["model"], "K": learner.K, "batch_size": batch_size,
               "input_size": input_size, "peak_bytes": result["peak_bytes"], "backend": result["backend"],
               "peak_module": result["peak_module"]}
        row.update({k: result["breakdown"].get(k) for k in ("params", "grads", "optimizer", "bank", "activations")})
        if bank is not None:
            row["bank_storage_bytes"] = bank.nbytes()
        rows.append(row)
        del learner
    _add_ratio(rows, "peak_bytes", "memory_ratio_to_bp")
    return rows


def measure_time(cfg: Mapping[str, Any], methods: Sequence[str], batch_size: int, input_size: int,
                 in_channels: int = 3, num_classes: int = 10, warmup: int = 2, steps: int = 10,
                 num_samples: int = 50_000, progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """Median seconds per training step after ``warmup`` steps (CUDA synchronised)."""
    device = resolve_device(cfg["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    rows = []
    for method in methods:
        progress(f"time: {method} ...")
        row = _distributed_row(cfg, method, "time", batch_size=batch_size, input_size=input_size,
                               in_channels=in_channels, num_classes=num_classes, num_samples=num_samples,
                               steps=steps, warmup=warmup)
        if row is not None:
            rows.append(row)
            continue
        learner = _learner(cfg, method, num_classes, in_channels, num_samples)
        images, labels, indices = _synthetic_batch(cfg, batch_size, in_channels, input_size, num_classes, num_samples, device)
        for _ in range(warmup):
            learner.train_step(images, labels, indices)
        times = []
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            learner.train_step(images, labels, indices)
            sync()
            times.append(time.perf_counter() - start)
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        rows.append({"method": method, "model": cfg["model"], "K": learner.K, "batch_size": batch_size,
                     "input_size": input_size, "seconds_per_step": statistics.median(times),
                     "iqr_seconds": quartiles[2] - quartiles[0]})
        del learner
    _add_ratio(rows, "seconds_per_step", "time_ratio_to_bp")
    return rows


def _add_ratio(rows: list[dict[str, Any]], key: str, ratio_key: str) -> None:
    base = next((r[key] for r in rows if r["method"] == "bp"), None)
    for r in rows:
        r[ratio_key] = (r[key] / base) if base else None
