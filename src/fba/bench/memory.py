"""Peak training memory.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` around the measured steps. On
CPU it is the peak of live tensor bytes, counted by a dispatch-mode tracker that sees every
tensor created by an operator (forward, backward and optimizer alike) and notices when its
storage is freed. The CPU figure is deterministic: it depends only on the model, the
method and the shapes, not on the host, so it can be compared across machines and runs.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_ptr(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class LiveTensorTracker(TorchDispatchMode):
    """Counts bytes of live tensor storages and records the peak.

    Storages that existed before the tracker started are counted once registered with
    :meth:`register`. At each new peak the tracker asks ``categories`` (name -> callable
    returning tensors) which live storages belong to them, giving a breakdown of the peak.
    """

    def __init__(self, categories: Mapping[str, Callable[[], Iterable[Tensor]]] | None = None,
                 phase: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.categories = dict(categories or {})
        self.peak_breakdown: dict[str, int] = {}
        self.phase = phase
        self.peak_phase: Any = None

    def register(self, tensors: Iterable[Tensor | None]) -> None:
        for t in tensors:
            if isinstance(t, Tensor):
                self._track(t)
        self._update_peak()

    def _track(self, t: Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr() if storage.nbytes() else id(storage)
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, 0)
        self.current -= nbytes

    def _update_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_breakdown = self._breakdown()
            if self.phase is not None:
                self.peak_phase = self.phase()

    def _breakdown(self) -> dict[str, int]:
        counted: set[int] = set()
        out: dict[str, int] = {}
        for name, tensors in self.categories.items():
            total = 0
            for t in tensors():
                if not isinstance(t, Tensor) or t.device.type == "meta":
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live and key not in counted:
                    counted.add(key)
                    total += self.live[key]
            out[name] = total
        out["activations"] = self.current - sum(out.values())
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: nothing new was allocated.
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and _storage_ptr(t) not in inputs:
                self._track(t)
        self._update_peak()
        return out


def _bytes(tensors: Iterable[Tensor], device: torch.device) -> int:
    """Bytes of the distinct storages among ``tensors`` that live on ``device``.

    Tensors elsewhere (a long-term bank kept on the CPU) take none of that device's memory.
    """
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and _same_device(t.device, device):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


class ModuleMarker:
    """Knows which local module a learner is running, so a peak can be blamed on one.

    A forward pre-hook on each of ``modules`` sets :attr:`current` to its index. A module's
    backward (and, with per-module stepping, its optimizer step) runs before the next
    module's forward, so the index also covers them. On CUDA the allocator's running peak
    is read at each change: the module during which it last rose is the one at the peak.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device | str = "cpu") -> None:
        self.current: int | None = None
        self.device = torch.device(device)
        self._cuda_peak = 0
        self.cuda_peak_module: int | None = None
        self._handles = [module.register_forward_pre_hook(self._enter(k)) for k, module in enumerate(modules)]

    def _enter(self, k: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._note_cuda_peak()
            self.current = k
        return hook

    def _note_cuda_peak(self) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            if peak > self._cuda_peak:
                self._cuda_peak, self.cuda_peak_module = peak, self.current

    def reset(self) -> None:
        """Forget the running peak (call after resetting the allocator's peak statistics)."""
        self.current, self._cuda_peak, self.cuda_peak_module = None, 0, None

    def finish(self) -> int | None:
        """Close the last interval; the CUDA peak's module (None on CPU)."""
        self._note_cuda_peak()
        return self.cuda_peak_module

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def peak_memory(fn: Callable[[], Any], *, device: torch.device | str | None = None,
                existing: Iterable[Tensor] = (),
                categories: Mapping[str, Callable[[], Iterable[Tensor]]] | None = None,
                marker: ModuleMarker | None = None) -> dict[str, Any]:
    """Run ``fn()`` and report its peak memory in bytes.

    Args:
        fn: the work to measure (e.g. two training steps).
        device: ``cuda`` devices use the CUDA allocator's peak; anything else the CPU tracker.
        existing: tensors alive before ``fn`` that count towards the peak (parameters,
            inputs, optimizer state, the bank).
        categories: name -> callable returning the tensors of that kind; the peak is split
            into these plus ``activations`` (everything else). On CPU each category is what
            was alive at the peak; on CUDA it is its size after the run.
        marker: tells which local module ran at the peak (``peak_module`` in the result).

    Returns:
        ``{"peak_bytes": int, "breakdown": {name: bytes}, "backend": "cuda" | "cpu-tracker",
        "peak_module": int | None}``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        # Whatever an earlier measurement left unreachable (a learner in a reference cycle)
        # must be freed before the peak is reset, or it would count towards this one.
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if marker is not None:
            marker.reset()
        fn()
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        peak_module = marker.finish() if marker is not None else None
        # The allocator cannot say what was alive at the peak; the categories are sized after
        # the run (their steady state) and the rest of the peak is reported as activations.
        breakdown = {name: _bytes(tensors(), device) for name, tensors in (categories or {}).items()}
        breakdown["activations"] = peak - sum(breakdown.values())
        return {"peak_bytes": peak, "breakdown": breakdown, "backend": "cuda", "peak_module": peak_module}
    tracker = LiveTensorTracker(categories, phase=(lambda: marker.current) if marker is not None else None)
    tracker.register(existing)
    with tracker:
        fn()
    return {"peak_bytes": int(tracker.peak), "breakdown": dict(tracker.peak_breakdown), "backend": "cpu-tracker",
            "peak_module": tracker.peak_phase}
