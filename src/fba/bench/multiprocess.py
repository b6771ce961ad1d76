"""Benchmark rows that run in several processes: DDP replicas and pipeline stages.

``fba bench memory|time --methods fba+ddp,fba+pipeline`` measures the method with 2 processes
on this machine (gloo on CPU, NCCL on CUDA), beside the single-process rows of the same run:

- ``+ddp``: 2 replicas, each training half of the batch, so one step is the same global batch
  as a single-process step.
- ``+pipeline``: 2 stages, the modules split by measured forward cost; the whole batch passes
  through both. The time per step is the steady-state time between batches.

Each process runs with one thread, so that 2 processes share the cores as one process with
its default threads does. Memory is the peak of the busiest process (the CPU tracker's live
tensors in each; CUDA's ``max_memory_allocated`` on each process's GPU). For the pipeline a
rank counts the weights, gradients and optimizer state of its own modules only: it also keeps
a copy of the other modules' weights (to evaluate and save the whole model), which is not
counted.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from typing import Any, Mapping

import torch

MODES = ("ddp", "pipeline")
WORLD_SIZE = 2


def measure_distributed(cfg: Mapping[str, Any], method: str, overrides: Mapping[str, Any], mode: str, what: str,
                        batch_size: int, input_size: int, in_channels: int, num_classes: int, num_samples: int,
                        steps: int, warmup: int = 0) -> dict[str, Any]:
    """One row of ``fba bench``: ``what`` is ``"memory"`` or ``"time"``; ``mode`` one of :data:`MODES`."""
    import torch.multiprocessing as mp

    if mode == "ddp" and batch_size % WORLD_SIZE:
        from fba.errors import ConfigError

        raise ConfigError(f"--batch-size {batch_size}: a +ddp row splits the batch over {WORLD_SIZE} processes; "
                          "give an even batch size")
    with tempfile.TemporaryDirectory() as folder:
        args = (dict(cfg), method, dict(overrides), mode, what, batch_size, input_size, in_channels, num_classes,
                num_samples, steps, warmup, _free_port(), folder)
        mp.spawn(_worker, args=args, nprocs=WORLD_SIZE, join=True)
        results = [torch.load(os.path.join(folder, f"{rank}.pt")) for rank in range(WORLD_SIZE)]
    row: dict[str, Any] = {"world_size": WORLD_SIZE, "mode": mode}
    if what == "memory":
        peaks = [r["peak_bytes"] for r in results]
        row.update(peak_bytes=max(peaks), peak_bytes_per_rank=peaks, backend=results[0]["backend"],
                   activations=max(r["activations"] for r in results))
    else:
        row.update(seconds_per_step=results[0]["seconds_per_step"], iqr_seconds=results[0]["iqr_seconds"])
    if "groups" in results[0]:
        row["module_groups"] = results[0]["groups"]
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, cfg: dict, method: str, overrides: dict, mode: str, what: str, batch_size: int,
            input_size: int, in_channels: int, num_classes: int, num_samples: int, steps: int, warmup: int,
            port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on the cores one process would use
    import torch.distributed as dist

    from fba.bench.memory import peak_memory
    from fba.bench.runner import _synthetic_batch
    from fba.build import build_learner, resolve_device
    from fba.distributed import device_for, distribute, setup_from_env, teardown

    info = setup_from_env()
    device = device_for(info, resolve_device(cfg["device"]))
    step_overrides = {"optim.step": "per_module"} if mode == "pipeline" and cfg["optim"]["step"] == "auto" else {}
    # data.batch_size is per process, as in training (partition=balanced weighs it)
    per_rank = {"data.batch_size": batch_size // WORLD_SIZE} if mode == "ddp" else {}
    learner = build_learner({**cfg, "device": str(device)}, method=method, num_classes=num_classes,
                            in_channels=in_channels, num_samples=num_samples, **{**overrides, **step_overrides, **per_rank})
    images, targets, indices = _synthetic_batch(cfg, batch_size, in_channels, input_size, num_classes, num_samples,
                                                device)
    result: dict[str, Any] = {}
    if mode == "ddp":
        half = slice(rank * batch_size // WORLD_SIZE, (rank + 1) * batch_size // WORLD_SIZE)
        images, targets, indices = images[half], targets[half], indices[half]
        owned = list(learner.parameters())

        def setup() -> None:
            distribute(learner, info, device)

        def step() -> None:
            learner.train_step(images, targets, indices)
    else:
        from fba.pipeline import PipelineStage, balanced_groups

        groups = balanced_groups(learner, (images, targets, indices) if rank == 0 else None, WORLD_SIZE)
        result["groups"] = [(g.start, g.stop) for g in groups]
        stage = PipelineStage(learner, groups, rank, device)
        owned = [p for k in stage.modules for p in learner.units[k].parameters()]

        def setup() -> None:
            pass

        # Each batch other samples, as in an epoch: the same samples again would make the first
        # stage wait for the last stage's long-term bank entries of the batch before.
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(cfg["seed"]))
        fed = [0]

        def step() -> None:
            batch = None
            if rank == 0:
                batch = (images, targets, order[(fed[0] * batch_size + torch.arange(batch_size)) % num_samples])
                fed[0] += 1
            stage.train_step(batch)

    dist.barrier()
    if what == "memory":
        bank = learner.bank.tensors() if learner.bank is not None else []
        state = lambda: [t for opt in learner.optimizers for s in opt.state.values() for t in s.values()  # noqa: E731
                         if torch.is_tensor(t)]
        measured = peak_memory(lambda: (setup(), *(step() for _ in range(steps))), device=device,
                               existing=[images, targets, indices, *owned, *bank],
                               categories={"params": lambda: owned, "optimizer": state})
        if mode == "pipeline":
            stage.finish()
        result.update(peak_bytes=measured["peak_bytes"], backend=measured["backend"],
                      activations=measured["breakdown"]["activations"])
    else:
        setup()
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        for _ in range(warmup):
            step()
        if mode == "pipeline":
            stage.finish()
        dist.barrier()
        times = []
        if mode == "ddp":
            for _ in range(steps):
                sync()
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
        else:
            # A pipeline's time per batch is its steady rate: the whole run over its batches,
            # measured at rank 0 from the first batch until the last rank has finished.
            start = time.perf_counter()
            for _ in range(steps):
                step()
            stage.finish()
            sync()
            dist.barrier()
            times = [(time.perf_counter() - start) / steps]
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        result.update(seconds_per_step=statistics.median(times), iqr_seconds=quartiles[2] - quartiles[0])
    torch.save(result, os.path.join(folder, f"{rank}.pt"))
    teardown(info, learner if mode == "ddp" else None)
