"""Auxiliary networks and the feature bank of local learning for super-resolution.

- :class:`SRLocalModule` is FBA's Simple Local Module for SR: a fresh ResBlock (the stage
  tail, EDSR's only block type), the early full-resolution map from the bank added back
  in (the same global skip the main network has), and a reconstruction tail.
- :class:`EarlyMapBank` is the SR bank: the head conv's map of the current batch, detached.
- :class:`ConvReconstructionAux` is DGL's auxiliary network adapted to SR: a few plain
  convolutions and a reconstruction tail, with no bank.
"""

from __future__ import annotations

from torch import Tensor, nn

from fba.tasks.super_resolution.models import EarlyMap


class SRLocalModule(nn.Module):
    """``forward(h, early=None) -> (sr, None)``: ``(N, F, h, w) -> (N, 3, h*s, w*s)``.

    ``tail(adapter(narrow(block(h)) + early_proj(early)))``, each optional part skipped when None.

    Args:
        block: a fresh ResBlock on the module's features.
        tail: a reconstruction tail (fresh, or the main network's when shared).
        narrow: 1x1 conv to the SLM's reduced width (``fba.reduction``).
        adapter: 1x1 conv from the reduced width to a shared tail's width.
        early_proj: 1x1 conv from the early map's width to the SLM's when they differ.
    """

    def __init__(self, block: nn.Module, tail: nn.Module, narrow: nn.Module | None = None,
                 adapter: nn.Module | None = None, early_proj: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.narrow = narrow
        self.early_proj = early_proj
        self.adapter = adapter
        self.tail = tail

    def forward(self, h: Tensor, early: Tensor | None = None) -> tuple[Tensor, None]:
        z = self.block(h)
        if self.narrow is not None:
            z = self.narrow(z)
        if early is not None:
            # The main network's global skip, rebuilt with the bank's detached copy: the tail sees
            # the fine detail of the early map, so this module need only learn the residual.
            z = z + (self.early_proj(early) if self.early_proj is not None else early)
        if self.adapter is not None:
            z = self.adapter(z)
        return self.tail(z), None


class EarlyMapBank:
    """The feature bank for SR: the head conv's output for the current batch, detached.

    It is the tensor the main network keeps anyway for its global skip, so it costs no
    compute and no memory beyond a reference. Implements the engine's bank interface.
    """

    source = "inpass"
    needs_lookahead = False

    def __init__(self, early: EarlyMap) -> None:
        self.early = early

    def begin_step(self, indices: Tensor | None) -> None:
        pass

    def write(self, k: int, h: Tensor) -> None:
        pass  # the head unit records the map itself

    def read(self, k: int, device) -> tuple[Tensor | None, None]:
        value = self.early.value
        return (value.detach() if value is not None else None), None

    def end_step(self) -> None:
        pass

    def tensors(self) -> list[Tensor]:
        """What the bank itself stores: nothing. The early map is an activation the network
        keeps for its global skip anyway, so memory reports count it as one."""
        return []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class ConvReconstructionAux(nn.Module):
    """DGL-style SR auxiliary network: ``depth`` x [conv3x3, ReLU], then a reconstruction tail."""

    def __init__(self, features: int, tail: nn.Module, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.tail = tail

    def forward(self, h: Tensor) -> Tensor:
        return self.tail(self.body(h))
