"""The memory-balanced partition (``partition=balanced``, DESIGN section 2).

A local step holds one module's graph at a time: the module's saved activations, its
auxiliary network's (or, for the last module, the head's) and the loss's, and the module's
gradients as its backward makes them. The auxiliary networks' weights and optimizer state,
on the other hand, are held all the time, and which networks there are depends on the cuts
(an FBA module ending in a deeper stage trains a copy of a wider block). So the training
peak above the backbone's and head's weights (the same for every partition) is the largest
module's cost plus every auxiliary network's weights and state, and a partition is
balanced when that sum is as small as K contiguous modules allow.

The bytes are measured, not modelled: one probe step of every unit alone (a learner with one
unit per module, so each unit has the auxiliary network it would have as a module's last
unit) counts the tensors autograd saves for backward, owner by owner, each unit's and
auxiliary network's trained parameters (their gradients), and each auxiliary network's
parameters and buffers, with the optimizer's state per parameter byte measured on a
one-parameter copy of the run's optimizer. Activations grow with the batch and the image
area and the weights do not, so the probe's activation figures are scaled to the run's batch
(:meth:`UnitActivationBytes.at_batch`) before the two are added.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, replace
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
        loss_net_weights: what the auxiliary network of a module ending at the unit holds for
            the whole run: its parameters, buffers and optimizer state (0 for the last unit,
            whose head every partition has; None: 0 for all). Not per batch.
        grads: the gradients of the unit's parameters, which its module's backward makes
            (per-module stepping frees them after the module's step; None: 0 for all).
        loss_net_grads: the same for the auxiliary network (the head for the last unit).
    """

    input: list[int]
    unit: list[int]
    output: list[int]
    loss_net: list[int]
    recompute_chunks: list[int] | None = None
    loss_net_weights: list[int] | None = None
    grads: list[int] | None = None
    loss_net_grads: list[int] | None = None

    def at_batch(self, factor: float) -> "UnitActivationBytes":
        """The same costs with every activation figure multiplied by ``factor`` (the run's
        batch over the probe's); the weights and gradients do not grow with the batch."""
        def scaled(values: list[int]) -> list[int]:
            return [round(v * factor) for v in values]

        return replace(self, input=scaled(self.input), unit=scaled(self.unit), output=scaled(self.output),
                       loss_net=scaled(self.loss_net))

    def weights_bytes(self, last: int) -> int:
        """What the auxiliary network of a module ending at unit ``last`` holds for the run."""
        return self.loss_net_weights[last] if self.loss_net_weights else 0

    def partition_bytes(self, groups: Sequence[Sequence[int]], checkpointed: frozenset[int] = frozenset()) -> int:
        """What ``partition=balanced`` minimises: the largest :meth:`module_bytes` plus every
        auxiliary network's weights and state (``groups``: contiguous unit indices)."""
        return (max(self.module_bytes(g[0], g[-1], k in checkpointed) for k, g in enumerate(groups))
                + sum(self.weights_bytes(g[-1]) for g in groups))

    def module_bytes(self, first: int, last: int, checkpointed: bool = False) -> int:
        """The peak bytes of a module of units ``first..last`` (inclusive) in its local step:
        activations and the gradients its backward has made by then.

        The backward runs the loss side first, then the units from the last to the first.
        Autograd frees what a unit saved once the unit's backward has run, and each unit's
        gradients appear during it. So the peak is the larger of the loss side's phase (every
        unit's activations, the loss side's, its gradients) and, for each unit u, u's phase:
        the activations of units ``first..u``, the loss side's gradients and those of units
        ``u..last``. The first units' gradients are thus never counted with the last units'
        activations; within a phase all of its gradients count (an upper bound).

        A checkpointed module (``checkpoint=``) keeps each unit's input and its own output,
        and recomputes one unit (or one batch chunk of it) at a time in its backward. The
        recomputation starts only once the loss side's backward has freed what it saved (the
        module's output feeds nothing else), so the two do not add up: the larger phase counts.
        """
        loss_side_grads = self.loss_net_grads[last] if self.loss_net_grads else 0

        def grads_from(u: int) -> int:  # the gradients held while unit u's backward runs
            return loss_side_grads + (sum(self.grads[u:last + 1]) if self.grads else 0)

        units = range(first, last + 1)
        if checkpointed:
            chunks = self.recompute_chunks or [1] * len(self.unit)
            held = sum(self.input[first:last + 1]) + self.output[last]
            return held + max(self.loss_net[last] + loss_side_grads,
                              max(self.unit[u] // chunks[u] + grads_from(u) for u in units))
        loss_phase = self.input[first] + sum(self.unit[first:last + 1]) + self.loss_net[last] + loss_side_grads
        unit_phases = (self.input[first] + sum(self.unit[first:u + 1]) + grads_from(u) for u in units)
        return max(loss_phase, *unit_phases)


def min_max_partition(n: int, K: int, cost: Callable[[int, int, int], float],
                      fixed: Callable[[int, int, int], float] | None = None) -> list[range]:
    """K contiguous, non-empty ranges covering ``0..n-1`` that minimise the largest
    ``cost(start, end, k)`` of range k (``start..end-1``), plus the sum of ``fixed(start, end,
    k)`` over the ranges when given.

    Ties go to the partition whose ranges start earliest, so the result is deterministic. A
    dynamic programme over the cut points keeps, for each prefix and number of ranges, the
    cuts no other cuts beat on both the largest cost and the fixed sum (a Pareto front: one
    entry without ``fixed``): ``O(K n^2 F)`` calls, F the largest front.
    """
    if not 1 <= K <= n:
        raise ValueError(f"K={K} for {n} items")
    # front[k][end]: (largest cost, fixed sum, start of range k-1, index in front[k-1][start])
    # for the non-dominated ways to cut items 0..end-1 into k ranges, by rising largest cost
    front: list[list[list[tuple[float, float, int, int]]]] = [[[] for _ in range(n + 1)] for _ in range(K + 1)]
    front[0][0] = [(0, 0, 0, -1)]
    for k in range(1, K + 1):
        for end in range(k, n - (K - k) + 1):
            candidates = []
            for start in range(k - 1, end):
                c = cost(start, end, k - 1)
                f = fixed(start, end, k - 1) if fixed is not None else 0
                for i, (largest, total, _, _) in enumerate(front[k - 1][start]):
                    candidates.append((max(largest, c), total + f, start, i))
            candidates.sort(key=lambda entry: entry[:3])
            for entry in candidates:
                if not front[k][end] or entry[1] < front[k][end][-1][1]:
                    front[k][end].append(entry)
    last = front[K][n]
    index = min(range(len(last)), key=lambda i: (last[i][0] + last[i][1], i))
    ranges, end = [], n
    for k in range(K, 0, -1):
        _, _, start, parent = front[k][end][index]
        ranges.append(range(start, end))
        end, index = start, parent
    return ranges[::-1]


def memory_balanced_groups(costs: UnitActivationBytes, K: int,
                           checkpointed: frozenset[int] = frozenset()) -> list[list[int]]:
    """K contiguous groups of unit indices minimising :meth:`UnitActivationBytes.partition_bytes`:
    the largest module's cost plus the auxiliary networks' weights and state.

    Args:
        checkpointed: indices of the modules that run under activation checkpointing.
    """
    def module(first: int, end: int, k: int) -> int:  # module k of units first..end-1
        return costs.module_bytes(first, end - 1, checkpointed=k in checkpointed)

    def weights(_first: int, end: int, _k: int) -> int:
        return costs.weights_bytes(end - 1)

    fixed = weights if costs.loss_net_weights else None
    return [list(group) for group in min_max_partition(len(costs.unit), K, module, fixed)]


def measure_unit_activation_bytes(learner: Any, inputs: Tensor, targets: Any, indices: Tensor | None = None,
                                  checkpoint_chunks: int = 0) -> UnitActivationBytes:
    """Count each unit's saved activations on one batch, in a learner with one unit per module,
    with its gradient bytes and its auxiliary network's weights (not per batch).

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
    return UnitActivationBytes(input_bytes, unit_bytes, output_bytes, loss_bytes, chunks,
                               *_weights_and_gradient_bytes(learner))


def _weights_and_gradient_bytes(learner: Any) -> tuple[list[int], list[int], list[int]]:
    """In a learner with one unit per module: each unit's auxiliary network's parameters,
    buffers and optimizer state (0 for the last unit, whose loss side is the head), each
    unit's gradient bytes, and each unit's loss side's (auxiliary network, or the head for
    the last unit). What an auxiliary network shares with the backbone or the head
    (``fba.share_head``) counts with them, not with it."""
    def storages(module: torch.nn.Module, buffers: bool = False) -> dict[int, tuple[int, bool]]:
        tensors = (*module.parameters(), *(module.buffers() if buffers else ()))
        return {t.untyped_storage().data_ptr(): (t.untyped_storage().nbytes(), t.requires_grad) for t in tensors}

    def trained(held: dict[int, tuple[int, bool]]) -> int:
        return sum(nbytes for nbytes, requires_grad in held.values() if requires_grad)

    shared = {*storages(learner.local_modules, buffers=True), *storages(learner.head, buffers=True)}
    own = [{ptr: v for ptr, v in storages(net, buffers=True).items() if ptr not in shared} for net in learner.aux_nets]
    state_per_byte = optimizer_state_per_parameter_byte(learner.optimizers[0]) if learner.optimizers else 0.0
    weights = [round(sum(nbytes for nbytes, _ in held.values()) + state_per_byte * trained(held)) for held in own]
    unit_grads = [trained(storages(module)) for module in learner.local_modules]
    loss_side_grads = [trained(held) for held in own] + [trained(storages(learner.head))]
    return weights + [0], unit_grads, loss_side_grads


def optimizer_state_per_parameter_byte(optimizer: torch.optim.Optimizer) -> float:
    """The bytes of state ``optimizer``'s kind keeps per byte of parameter (SGD with momentum
    1, Adam and AdamW 2, plain SGD 0), measured by one step of a fresh copy on one parameter."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    options = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in ("foreach", "fused")}
    parameter = torch.zeros(1024, requires_grad=True)
    copy = type(optimizer)([parameter], **options)
    parameter.grad = torch.zeros_like(parameter)
    copy.step()
    state = [t for s in copy.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() == parameter.numel()]
    return sum(t.untyped_storage().nbytes() for t in state) / parameter.untyped_storage().nbytes()
