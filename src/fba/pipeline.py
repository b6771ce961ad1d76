"""Local modules pipelined across processes (``distributed.mode=pipeline``).

Launch with ``torchrun --nproc_per_node=N -m fba.cli train distributed.mode=pipeline ...``.
Each rank owns a contiguous group of modules with their auxiliary networks and optimizers.
For each batch, rank r receives from rank r-1 the detached activations with the batch's
inputs, targets, dataset indices and the in-pass bank summaries that later modules read,
trains its modules (forward, local losses, backward, a step per module), and sends its output
on. No gradient travels back, so a rank starts the next batch as soon as it has sent this one:
every rank is busy on a different batch, with no bubble waiting for a backward.

The long-term bank is written by the last module and read by every earlier one. The last rank
sends each step's ``(indices, summaries)`` back to every earlier rank asynchronously; a rank
waits for them only before a batch that holds a sample whose entry is still on its way (in
practice, only at an epoch boundary on a tiny dataset).

The pipelined step is the single-process step with per-module stepping: module k's output for
batch t comes from module k's parameters before its update at t in both, and every bank read
sees the same table. The parameters are equal, not merely close (tests/test_pipeline.py).

Transport is ``torch.distributed`` point-to-point (``isend``/``irecv``): a message is a list of
tensors, sent as a length, a header of dtypes and shapes, and the tensors.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from fba.engine.balance import min_max_partition
from fba.engine.bn import frozen_bn_statistics
from fba.errors import ConfigError

FORWARD_TAG, BANK_TAG = 1, 2
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8]
_NONE = -1
#: batches a rank may send ahead before waiting for the oldest send to complete
SEND_DEPTH = 2


# ---- module groups ----------------------------------------------------------------------------
def balance(costs: Sequence[float], ranks: int) -> list[range]:
    """Contiguous module groups, one per rank, minimising the largest group's total cost.

    Args:
        costs: the cost of each module (e.g. its measured forward time), length K >= ranks.
    """
    K = len(costs)
    if ranks > K:
        raise ConfigError(f"distributed.mode=pipeline: {ranks} processes but only K={K} modules; "
                          f"use at most {K} processes or a larger K")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    return min_max_partition(K, ranks, lambda start, end, _: prefix[end] - prefix[start])


def measure_module_costs(learner, inputs: Tensor, targets: Any, indices: Tensor | None, repeats: int = 2) -> list[float]:
    """Seconds of each module's local step (forward, local loss, backward) on a batch.

    Side-effect free: BatchNorm statistics are frozen, the gradients are dropped and no
    optimizer steps, and the bank commits nothing. The last of ``repeats`` passes counts,
    since the first one pays for one-off allocations and kernel choices.
    """
    costs: list[float] = []
    with frozen_bn_statistics(learner), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            costs = []
            learner.method.begin_step(inputs, targets)
            if learner.bank is not None:
                learner.bank.begin_step(indices)
            h = inputs
            for unit in learner.units:
                start = time.perf_counter()
                h, loss = unit(h.detach(), targets)
                loss.backward()
                costs.append(time.perf_counter() - start)
            learner.zero_grad(set_to_none=True)
            if learner.bank is not None:
                learner.bank.begin_step(None)  # drop this batch's features without committing them
    return costs


def balanced_groups(learner, batch: tuple[Tensor, Any, Tensor | None] | None, world_size: int) -> list[range]:
    """Every rank's module group, balanced on rank 0 by :func:`measure_module_costs` on ``batch``
    (given on rank 0 only, None elsewhere) and broadcast, so that all ranks agree."""
    import torch.distributed as dist

    groups: list[Any] = [None]
    if batch is not None:
        groups = [[(g.start, g.stop) for g in balance(measure_module_costs(learner, *batch), world_size)]]
    dist.broadcast_object_list(groups, src=0)
    return [range(a, b) for a, b in groups[0]]


# ---- messages -----------------------------------------------------------------------------------
def _header(tensors: Sequence[Tensor | None]) -> Tensor:
    codes: list[int] = [len(tensors)]
    for t in tensors:
        if t is None:
            codes += [_NONE, 0]
        else:
            codes += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    return torch.tensor(codes, dtype=torch.int64)


def send_tensors(tensors: Sequence[Tensor | None], dst: int, tag: int) -> list[Any]:
    """Start sending a list of tensors (None allowed); returns the works and what they hold."""
    import torch.distributed as dist

    header = _header(tensors)
    length = torch.tensor([header.numel()], dtype=torch.int64)
    payload = [t.detach().contiguous() for t in tensors if t is not None]
    works = [dist.isend(length, dst, tag=tag), dist.isend(header, dst, tag=tag)]
    works += [dist.isend(t, dst, tag=tag) for t in payload]
    return [works, [length, header, *payload]]  # the tensors must outlive the sends


def recv_tensors(src: int, tag: int, device: torch.device, length: Tensor | None = None) -> list[Tensor | None]:
    """Receive a list sent by :func:`send_tensors` (``length`` if its first part has arrived)."""
    import torch.distributed as dist

    if length is None:
        length = torch.zeros(1, dtype=torch.int64)
        dist.recv(length, src, tag=tag)
    header = torch.zeros(int(length), dtype=torch.int64)
    dist.recv(header, src, tag=tag)
    codes = header.tolist()
    out: list[Tensor | None] = []
    position, pending = 1, []
    for _ in range(codes[0]):
        dtype, ndim = codes[position], codes[position + 1]
        shape = codes[position + 2: position + 2 + ndim]
        position += 2 + ndim
        if dtype == _NONE:
            out.append(None)
            continue
        t = torch.empty(shape, dtype=_DTYPES[dtype])
        pending.append(dist.irecv(t, src, tag=tag))
        out.append(t)
    for work in pending:
        work.wait()
    return [t.to(device) if t is not None else None for t in out]


# ---- one rank of the pipeline ---------------------------------------------------------------------
class PipelineStage:
    """The modules one rank owns, and the messages it exchanges with its neighbours.

    Args:
        learner: the whole learner (every rank builds it; each trains only its own modules).
        groups: the module range of every rank, contiguous and in order.
        rank: this process's rank.
        device: where this rank computes.
    """

    def __init__(self, learner, groups: Sequence[range], rank: int, device: torch.device) -> None:
        if learner.step_mode != "per_module":
            raise ConfigError("distributed.mode=pipeline steps each module on its own (optim.step=per_module or "
                              "auto); a global step would wait for every module's backward")
        if learner.bank is not None and learner.bank.needs_lookahead:
            raise ConfigError("distributed.mode=pipeline cannot use fba.bank.source=lookahead: its extra forward "
                              "needs every module at the start of the step; use longterm, inpass or none")
        if getattr(learner, "shares_state_across_units", False):
            raise ConfigError("distributed.mode=pipeline: this model passes state between modules outside their "
                              "activations (EDSR's global skip), which the pipeline does not carry")
        try:
            learner.check_units_own_their_parameters("a pipeline stage steps the parameters of its own modules")
        except ValueError as error:
            raise ConfigError(f"distributed.mode=pipeline: {error}") from None
        self.learner, self.groups, self.rank, self.device = learner, list(groups), rank, device
        self.modules = self.groups[rank]
        self.is_first, self.is_last = rank == 0, rank == len(self.groups) - 1
        self.step = 0  # batches this stage has trained
        self._sends: list[list[Any]] = []
        self._bank_sends: list[list[Any]] = []
        # Long-term entries arriving from the last rank, committed in step order.
        self._bank_expected = 0  # the next step whose entries this rank has not committed
        self._bank_length: Tensor | None = None
        self._bank_work = None
        self._last_visit: dict[int, int] = {}
        self.uses_longterm = learner.bank is not None and getattr(learner.bank, "source", None) == "longterm"

    # ---- the step ---------------------------------------------------------------------------
    def train_step(self, batch: tuple[Tensor, Any, Tensor | None] | None = None) -> dict[str, float]:
        """Train this rank's modules on the next batch: given to the first rank, received by the others.

        Returns this rank's losses (``"loss"`` is the task loss on the last rank only).
        """
        if self.is_first:
            assert batch is not None, "the first pipeline stage is fed the batches"
            inputs, targets, indices = batch
            h, features = inputs, {}
        else:
            inputs, h, targets, indices, features = self._receive_activations()
        if self.uses_longterm and indices is not None and not self.is_last:
            self._wait_for_bank_entries(indices)
        result = self.learner.train_modules(self.modules, inputs, h, targets, indices, bank_features=features)
        if not self.is_last:
            self._send_activations(inputs, result.output, targets, indices, {**features, **result.bank_features})
        elif self.uses_longterm and result.bank_entries is not None:
            self._send_bank_entries(*result.bank_entries)
        self.step += 1
        out = dict(result.losses)
        if not self.is_last:
            out.pop("loss")
        return out

    def finish(self) -> None:
        """Complete every send, and commit every long-term entry still on its way (e.g. at an epoch's end)."""
        for works, _ in self._sends + self._bank_sends:
            for work in works:
                work.wait()
        self._sends.clear()
        self._bank_sends.clear()
        if self.uses_longterm and not self.is_last:
            while self._bank_expected < self.step:
                self._commit_next_bank_entries(block=True)

    # ---- forward channel ----------------------------------------------------------------------
    def _send_activations(self, inputs, h, targets, indices, features: dict[int, Tensor]) -> None:
        while len(self._sends) >= SEND_DEPTH:  # bounded: at most SEND_DEPTH batches in flight
            for work in self._sends.pop(0)[0]:
                work.wait()
        keys = sorted(features)
        tensors = [inputs, h, targets, indices, torch.tensor(keys, dtype=torch.int64), *(features[k] for k in keys)]
        self._sends.append(send_tensors(tensors, self.rank + 1, FORWARD_TAG))

    def _receive_activations(self):
        inputs, h, targets, indices, keys, *features = recv_tensors(self.rank - 1, FORWARD_TAG, self.device)
        if indices is not None:
            indices = indices.cpu()
        return inputs, h, targets, indices, dict(zip(keys.tolist(), features))

    # ---- the long-term bank's way back ----------------------------------------------------------
    def _send_bank_entries(self, indices: Tensor, summaries: Tensor) -> None:
        self._bank_sends = [s for s in self._bank_sends if not all(w.is_completed() for w in s[0])]
        for rank in range(self.rank):
            self._bank_sends.append(send_tensors([indices, summaries], rank, BANK_TAG))

    def _wait_for_bank_entries(self, indices: Tensor) -> None:
        """Before a batch: commit what has arrived, and wait for entries its samples need."""
        steps = [self._last_visit.get(i, -1) for i in indices.tolist()]
        needed = max(steps) if steps else -1
        while self._commit_next_bank_entries(block=self._bank_expected <= needed):
            pass
        for i in indices.tolist():
            self._last_visit[i] = self.step

    def _commit_next_bank_entries(self, block: bool) -> bool:
        """Commit the next step's entries if they have arrived (or, with ``block``, once they do)."""
        import torch.distributed as dist

        if self._bank_expected >= self.step:
            return False  # the last rank has not trained a later batch than this one
        if self._bank_work is None:
            self._bank_length = torch.zeros(1, dtype=torch.int64)
            self._bank_work = dist.irecv(self._bank_length, len(self.groups) - 1, tag=BANK_TAG)
        if not block and not self._bank_work.is_completed():
            return False
        self._bank_work.wait()
        indices, summaries = recv_tensors(len(self.groups) - 1, BANK_TAG, torch.device("cpu"), self._bank_length)
        self.learner.bank.commit(indices, summaries)
        self._bank_work = None
        self._bank_expected += 1
        return True

    # ---- a whole model on rank 0 -------------------------------------------------------------------
    def gather_to_main(self) -> None:
        """Give every rank (rank 0 evaluates and saves) each module's trained state from its owner:
        parameters, buffers, optimizer and scheduler state."""
        import torch.distributed as dist

        learner = self.learner
        self.finish()
        for owner, group in enumerate(self.groups):
            for k in group:
                unit = learner.units[k]
                for t in [*unit.parameters(), *unit.buffers()]:
                    dist.broadcast(t.data, src=owner)
                state = [learner.optimizers[k].state_dict(),
                         learner.schedulers[k].state_dict() if learner.schedulers else None]
                dist.broadcast_object_list(state, src=owner)
                if self.rank != owner:
                    learner.optimizers[k].load_state_dict(state[0])
                    if learner.schedulers:
                        learner.schedulers[k].load_state_dict(state[1])
        dist.barrier()
