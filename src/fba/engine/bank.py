"""The feature bank: detached, training-only features that auxiliary networks read.

Sources (DESIGN section 4):
- ``inpass``: features written earlier in the same step. Module k's auxiliary network reads,
  for every stage (scale) reached so far, the summary of the latest earlier module in that
  stage, concatenated: one vector per scale, so the width stays bounded by the sum of the
  stage widths however deep the network. Costs no extra compute.
- ``longterm``: per-sample summaries of the last module kept across steps, indexed by the
  dataset sample index: written when a sample passes, read at its next visit. Stored
  compactly (fp16 by default, on CPU by default), ``num_samples * dim`` values.
- ``lookahead``: one no-grad forward of the whole backbone at the start of the step fills
  the summary of every module for the current batch; auxiliary networks read the deepest.

Nothing stored here carries autograd history, and the bank is never read in eval.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

BANK_SOURCES = ("none", "inpass", "longterm", "lookahead")
BANK_USAGES = ("input", "target")


def inpass_sources(module_stages: Sequence[int], k: int) -> list[int]:
    """Modules whose summaries the in-pass bank gives module k: the latest earlier one per stage."""
    latest: dict[int, int] = {}
    for j in range(k):
        latest[module_stages[j]] = j
    return sorted(latest.values())


def bank_read_channels(source: str, module_channels: Sequence[int], module_stages: Sequence[int], k: int) -> int:
    """Channels of what the bank returns to module k's auxiliary network (0: nothing)."""
    if source == "inpass":
        return sum(module_channels[j] for j in inpass_sources(module_stages, k))
    if source in ("longterm", "lookahead"):
        return module_channels[-1]
    return 0


class FeatureBank:
    """Stores per-module summaries of backbone features.

    Args:
        source: one of :data:`BANK_SOURCES`.
        module_channels: channels of each module's summary (length K).
        module_stages: stage index of each module's output (length K).
        summarize: maps a module's output map to what is stored (e.g. global average
            pooling for classification).
        num_samples: dataset size, to allocate the long-term table up front (else it grows).
        storage_device: where the long-term table lives (``"cpu"`` keeps GPU memory free).
        storage_dtype: dtype of the long-term table.
    """

    def __init__(
        self,
        source: str,
        module_channels: Sequence[int],
        module_stages: Sequence[int],
        summarize: Callable[[Tensor], Tensor],
        num_samples: int | None = None,
        storage_device: str | torch.device = "cpu",
        storage_dtype: torch.dtype = torch.float16,
    ) -> None:
        if source not in BANK_SOURCES:
            raise ValueError(f"bank source must be one of {BANK_SOURCES}, got {source!r}")
        self.source = source
        self.module_channels = list(module_channels)
        self.module_stages = list(module_stages)
        self.summarize = summarize
        self._step: dict[int, Tensor] = {}
        self._indices: Tensor | None = None
        self.table: Tensor | None = None
        self.filled: Tensor | None = None
        self._rows: tuple[Tensor, Tensor] | None = None  # this step's table rows, on the device
        self._rows_device: torch.device | str | None = None
        self._warned = False
        #: set by a distributed learner (:class:`fba.engine.learner.Collectives`)
        self.collectives = None
        if source == "longterm":
            # Sized to the training set when known; otherwise grown to the largest index seen.
            rows = num_samples or 0
            self.table = torch.zeros(rows, self.module_channels[-1], dtype=storage_dtype, device=storage_device)
            self.filled = torch.zeros(rows, dtype=torch.bool, device=storage_device)

    # ---- shapes -------------------------------------------------------------------------
    @property
    def needs_lookahead(self) -> bool:
        return self.source == "lookahead"

    # ---- one training step ----------------------------------------------------------------
    def begin_step(self, indices: Tensor | None) -> None:
        self._step.clear()
        self._rows = None
        if self.source == "longterm" and indices is None and not self._warned:
            warnings.warn("the long-term feature bank needs the dataset indices of each batch "
                          "(train_step(inputs, targets, indices)); without them it is skipped", stacklevel=3)
            self._warned = True
        if self.source == "longterm" and indices is not None:
            # Once per step: the K-1 reads and the commit all index the table with these.
            indices = indices.to(self.table.device)
            self._ensure_rows(int(indices.max()) + 1)
        self._indices = indices

    @property
    def _longterm_active(self) -> bool:
        return self.source == "longterm" and self._indices is not None

    def write(self, k: int, h: Tensor) -> None:
        """Record module k's output (detached) for this step."""
        if self.source == "inpass" or (self._longterm_active and k == len(self.module_channels) - 1):
            with torch.no_grad():
                self._step[k] = self.summarize(h.detach()).float()

    def write_lookahead(self, k: int, h: Tensor) -> None:
        """Record module k's output from the lookahead forward (before the local pass)."""
        with torch.no_grad():
            self._step[k] = self.summarize(h.detach()).float()

    def read(self, k: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """Bank features for module k's auxiliary network on ``device``, and a mask of valid rows.

        Returns ``(features, valid)``; ``features`` is None when there is nothing to read;
        ``valid`` is None when every row is valid (only long-term rows can be unfilled).
        """
        if self.source == "inpass":
            sources = inpass_sources(self.module_stages, k)
            if not sources:
                return None, None
            return torch.cat([self._step[j] for j in sources], dim=1), None
        if self.source == "lookahead":
            return self._step[len(self.module_channels) - 1], None
        if self._longterm_active:
            if self._rows is None or self._rows_device != device:
                self._rows, self._rows_device = self._gather_rows(torch.device(device)), device
            return self._rows
        return None, None

    def _gather_rows(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """This batch's rows of the table on ``device``: gathered once a step, whatever K is."""
        assert self.table is not None and self.filled is not None and self._indices is not None
        idx = self._indices
        if device.type == "cuda" and self.table.device.type == "cpu":
            # Gather into page-locked memory so that the copy to the GPU runs asynchronously.
            rows = torch.empty((len(idx), self.table.shape[1]), dtype=self.table.dtype, pin_memory=True)
            torch.index_select(self.table, 0, idx, out=rows)
            return rows.to(device, non_blocking=True).float(), self.filled[idx].to(device, non_blocking=True)
        return self.table[idx].to(device, torch.float32), self.filled[idx].to(device)

    def end_step(self) -> None:
        """Commit this step's last-module summaries to the long-term table.

        Distributed, every process commits every process's entries, so all hold the same
        full table: a sample's next visit is usually on another process.
        """
        entries = self.step_entries()
        if entries is not None:
            idx, last = entries
            if self.collectives is not None:
                idx = self.collectives.gather_rows(idx.to(last.device))
                last = self.collectives.gather_rows(last)
            self.commit(idx, last)
        self._step.clear()
        self._rows = None

    def step_entries(self) -> tuple[Tensor, Tensor] | None:
        """This step's long-term entries: ``(indices (N,), last-module summaries (N, C))``, if any.

        Only the process that runs the last module has them (a pipeline's last stage).
        """
        last = len(self.module_channels) - 1
        if self._longterm_active and last in self._step:
            assert self._indices is not None
            return self._indices, self._step[last]
        return None

    def commit(self, indices: Tensor, summaries: Tensor) -> None:
        """Write long-term rows: ``summaries (N, C)`` of the samples ``indices (N,)``."""
        assert self.table is not None and self.filled is not None
        indices = indices.to(self.table.device)
        self._ensure_rows(int(indices.max()) + 1)
        self.table[indices] = summaries.to(self.table.device, self.table.dtype)
        self.filled[indices] = True

    def step_features(self) -> dict[int, Tensor]:
        """The in-pass summaries written so far this step (module index -> ``(N, C_k)``)."""
        return dict(self._step) if self.source == "inpass" else {}

    def load_step_features(self, features: dict[int, Tensor]) -> None:
        """Take in-pass summaries that earlier modules wrote in another process this step."""
        self._step.update(features)

    def _ensure_rows(self, rows: int) -> None:
        assert self.table is not None and self.filled is not None
        if rows > self.table.shape[0]:
            grow = max(rows, 2 * self.table.shape[0]) - self.table.shape[0]
            self.table = torch.cat([self.table, self.table.new_zeros(grow, self.table.shape[1])])
            self.filled = torch.cat([self.filled, self.filled.new_zeros(grow)])

    # ---- accounting and persistence --------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the bank right now (long-term table plus this step's features)."""
        total = sum(t.numel() * t.element_size() for t in self._step.values())
        if self.table is not None and self.filled is not None:
            total += self.table.numel() * self.table.element_size() + self.filled.numel()
        return total

    def tensors(self) -> list[Tensor]:
        out = list(self._step.values())
        if self.table is not None and self.filled is not None:
            out += [self.table, self.filled]
        return out

    def state_dict(self) -> dict[str, Tensor]:
        if self.table is None or self.filled is None:
            return {}
        return {"table": self.table, "filled": self.filled}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.table is not None and self.filled is not None and state:
            self.table = state["table"].to(self.table.device, self.table.dtype).clone()
            self.filled = state["filled"].to(self.filled.device).clone()


class StepOnlyBank:
    """Base of a task's bank that keeps nothing across steps (maps of the current batch only).

    Such a bank has no long-term entries and no state to checkpoint. Subclasses implement
    ``begin_step``, ``write``, ``read``, ``end_step``, ``tensors`` and the in-pass hand-over
    (``step_features``, ``load_step_features``) of the engine's bank interface.
    """

    source = "inpass"
    needs_lookahead = False
    collectives = None  # nothing to gather: every process's step is its own

    def step_entries(self) -> None:
        return None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        return []

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass
