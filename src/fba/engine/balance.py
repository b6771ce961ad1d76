"""The memory-balanced partition (``partition=balanced``, DESIGN section 2).

A local step holds one module's graph at a time: the module's saved activations, its
auxiliary network's (or, for the last module, the head's) and the loss's. So the training
peak above the weights is the largest module's activation bytes, and a partition is balanced
when that largest figure is as small as K contiguous modules allow.

The bytes are measured, not modelled: one probe step of every unit alone (a learner with one
unit per module, so each unit has the auxiliary network it would have as a module's last
unit) counts the tensors autograd saves for backward, owner by owner. Every figure scales
with the batch and the image area, so the argmin holds at other sizes (up to the rounding of
strides); the weights, gradients and optimizer state are the same for every partition of the
backbone and are left out. So are the auxiliary networks' own weights, which do change with
the cuts and can outweigh what a cut saves (RetinaNet-R34 K=4: docs/detection.md, Memory).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fba.engine.bn import frozen_bn_statistics
from fba.engine.checkpointing import BatchChunkable


@dataclass(frozen=True)
class UnitActivationBytes:
    """What each backbone unit costs in a local step, in bytes (per probe batch).

    Attributes:
        input: the unit's input, which a module starting at the unit holds (the detached
            output of the previous module, or the images).
        unit: what the unit's forward saves for backward, its output included (its input not).
        output: the unit's output alone.
        loss_net: what the loss side saves when a module ends at the unit: its auxiliary
            network and local loss, or for the last unit the head and task loss (the unit's
            output not).
        recompute_chunks: the batch chunks a checkpointed module runs the unit in (the
            config's ``checkpoint_chunks`` for a unit with a batch-chunkable part, such as a
            conv-BatchNorm stem; 1 for the others; None: 1 for all).
    """

    input: list[int]
    unit: list[int]
    output: list[int]
    loss_net: list[int]
    recompute_chunks: list[int] | None = None

    def module_bytes(self, first: int, last: int, checkpointed: bool = False) -> int:
        """The activation bytes of a module of units ``first..last`` (inclusive).

        A checkpointed module (``checkpoint=``) keeps each unit's input and its own output,
        and recomputes one unit (or one batch chunk of it) at a time in its backward.
        """
        if checkpointed:
            chunks = self.recompute_chunks or [1] * len(self.unit)
            recompute = max(self.unit[i] // chunks[i] for i in range(first, last + 1))
            return sum(self.input[first:last + 1]) + self.output[last] + recompute + self.loss_net[last]
        return self.input[first] + sum(self.unit[first:last + 1]) + self.loss_net[last]


def min_max_partition(n: int, K: int, cost: Callable[[int, int, int], float]) -> list[range]:
    """K contiguous, non-empty ranges covering ``0..n-1`` that minimise the largest
    ``cost(start, end, k)`` of range k (``start..end-1``).

    Ties go to the partition whose ranges start earliest (the DP keeps the first best cut),
    so the result is deterministic. ``O(K n^2)`` calls of ``cost``.
    """
    if not 1 <= K <= n:
        raise ValueError(f"K={K} for {n} items")
    inf = float("inf")
    # best[k][e]: the smallest largest cost of the first e items in k ranges
    best = [[inf] * (n + 1) for _ in range(K + 1)]
    cut = [[0] * (n + 1) for _ in range(K + 1)]
    best[0][0] = 0
    for k in range(1, K + 1):
        for end in range(k, n - (K - k) + 1):
            for start in range(k - 1, end):
                value = max(best[k - 1][start], cost(start, end, k - 1))
                if value < best[k][end]:
                    best[k][end], cut[k][end] = value, start
    ranges, end = [], n
    for k in range(K, 0, -1):
        ranges.append(range(cut[k][end], end))
        end = cut[k][end]
    return ranges[::-1]


def memory_balanced_groups(costs: UnitActivationBytes, K: int,
                           checkpointed: frozenset[int] = frozenset()) -> list[list[int]]:
    """K contiguous groups of unit indices minimising the largest module's activation bytes.

    Args:
        checkpointed: indices of the modules that run under activation checkpointing.
    """
    def module(first: int, end: int, k: int) -> int:  # module k of units first..end-1
        return costs.module_bytes(first, end - 1, checkpointed=k in checkpointed)

    return [list(group) for group in min_max_partition(len(costs.unit), K, module)]


def measure_unit_activation_bytes(learner: Any, inputs: Tensor, targets: Any, indices: Tensor | None = None,
                                  checkpoint_chunks: int = 0) -> UnitActivationBytes:
    """Count each unit's saved activations on one batch, in a learner with one unit per module.

    ``checkpoint_chunks`` is the config's: the batch chunks of a unit's batch-chunkable parts
    when its module is checkpointed (0: none).

    Side-effect free like :func:`fba.pipeline.measure_module_costs`: BatchNorm statistics
    are frozen, no backward runs, no optimizer steps and the bank commits nothing. A
    tensor counts once, by its storage, and parameters (or autocast's copies of them) not at
    all.
    """
    if learner.K != len(learner.groups) or any(len(group) != 1 for group in learner.groups):
        raise ValueError("measure_unit_activation_bytes needs a learner with one unit per module")
    parameters = {p.untyped_storage().data_ptr() for p in learner.parameters()}
    parameter_ids = {id(p) for p in learner.parameters()}

    def is_weight_copy(tensor: Tensor) -> bool:  # autocast's low-precision copy of a parameter
        grad_fn = tensor.grad_fn
        if grad_fn is None or type(grad_fn).__name__ != "ToCopyBackward0":
            return False
        source = grad_fn.next_functions[0][0] if grad_fn.next_functions else None
        return id(getattr(source, "variable", None)) in parameter_ids
    input_bytes: list[int] = []
    unit_bytes: list[int] = []
    output_bytes: list[int] = []
    loss_bytes: list[int] = []
    saved: dict[int, int] = {}  # storage address -> bytes, of the current owner

    def pack(tensor: Tensor) -> Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without one storage (sparse, nested)
            return tensor
        if storage.data_ptr() not in parameters and not is_weight_copy(tensor):
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def unpack(tensor: Tensor) -> Tensor:
        return tensor

    def total(exclude: Sequence[Tensor]) -> int:
        for tensor in exclude:
            saved.pop(tensor.untyped_storage().data_ptr(), None)
        return sum(saved.values())

    with frozen_bn_statistics(learner), warnings.catch_warnings(), \
            torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        warnings.simplefilter("ignore")
        learner.method.begin_step(inputs, targets)
        if learner.bank is not None:
            learner.bank.begin_step(indices)
            if learner.bank.needs_lookahead:
                learner._lookahead(inputs)  # no grad: it saves nothing, as in the real step
        h = inputs
        for unit in learner.units:
            h_in = h.detach()
            outputs: list[Tensor] = []

            def unit_done(_module, _args, output, outputs=outputs, h_in=h_in):
                saved[output.untyped_storage().data_ptr()] = output.untyped_storage().nbytes()
                output_bytes.append(output.untyped_storage().nbytes())
                unit_bytes.append(total([h_in]))
                saved.clear()
                outputs.append(output)

            input_bytes.append(h_in.untyped_storage().nbytes())
            saved.clear()
            hook = unit.module.register_forward_hook(unit_done)
            try:
                with learner._autocast():
                    h, loss = unit(h_in, targets)
            finally:
                hook.remove()
            loss_bytes.append(total([h_in, *outputs]))
            saved.clear()
            # No backward: the bytes are counted as autograd saves them, and dropping the graph
            # here spares the probe every unit's gradients.
            del loss
        if learner.bank is not None:
            learner.bank.begin_step(None)  # drop this batch's features without committing them
    chunks = [checkpoint_chunks if checkpoint_chunks > 1 and any(isinstance(m, BatchChunkable)
                                                                  for m in unit.module.modules()) else 1
              for unit in learner.units]
    return UnitActivationBytes(input_bytes, unit_bytes, output_bytes, loss_bytes, chunks)
