"""Atomic checkpoints: safetensors weights plus a torch-saved resumable training state."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from fba.errors import DataError

WEIGHTS = "last.safetensors"
STATE = "last_state.pt"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(folder: Path, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    # State first: a weights file is only ever newer-or-equal to its state.
    atomic_write(folder / STATE, lambda p: torch.save(state, p))
    atomic_write(folder / WEIGHTS, lambda p: save_file({k: v.cpu() for k, v in weights.items()}, p))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"checkpoint {str(path)!r} is corrupt: {error}") from None


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"training state {str(path)!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # pickle errors come in many types
        raise DataError(f"training state {str(path)!r} is corrupt: {error}") from None
