"""Data-parallel local learning with torchrun + DDP.

Launch with ``torchrun --nproc_per_node=N -m fba.cli train ...`` (or the ``fba`` script
through ``torchrun --no-python``). Every process holds a replica; each local unit (module k
with its auxiliary network, or the last module with the head) is its own DDP instance, so
the gradients of module k are averaged during module k's backward, overlapping with the
next module's work, and no gradient ever crosses a module boundary. ``data.batch_size`` is
per process. The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fba.errors import FBAError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_from_env() -> DistInfo:
    """Join the process group that torchrun describes in the environment (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for(info: DistInfo, requested: torch.device) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if info.enabled and requested.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return requested


class ProcessGroupCollectives:
    """The collectives the learner and the feature bank use, over the default process group."""

    def __init__(self, info: DistInfo) -> None:
        self.rank = info.rank
        self.world_size = info.world_size

    def gather_rows(self, t: Tensor) -> Tensor:
        """Every process's ``t`` concatenated along dim 0 in rank order; dim 0 may differ by rank.

        ``t`` must be on the backend's device (CUDA for NCCL). Rows are padded to the largest
        count for the all-gather and trimmed after it.
        """
        import torch.distributed as dist

        count = torch.tensor([t.shape[0]], device=t.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def distribute(learner, info: DistInfo, device: torch.device) -> None:
    """Make every local unit of ``learner`` its own DDP instance, its bank shared by all processes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def wrap(unit: nn.Module) -> nn.Module:
        return DDP(unit, device_ids=[device.index] if device.type == "cuda" else None)

    try:
        learner.distribute(wrap, ProcessGroupCollectives(info))
    except ValueError as error:
        raise FBAError(str(error)) from None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def teardown(info: DistInfo, learner=None) -> None:
    """Leave the process group cleanly.

    The DDP wrappers go first: a DDP reducer destroyed after its process group aborts the
    process ("terminate called without an active exception").
    """
    if info.enabled:
        import gc

        import torch.distributed as dist

        if learner is not None:
            learner.undistribute()
        gc.collect()
        if dist.is_initialized():
            # Everyone arrives before anyone leaves: a process that exits while a peer still
            # holds open gloo connections makes that peer abort.
            dist.barrier()
            dist.destroy_process_group()
