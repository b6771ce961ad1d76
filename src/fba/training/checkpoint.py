"""Atomic checkpoints: safetensors weights plus a torch-saved resumable training state.

Each file is replaced atomically, and the pair is kept consistent across a crash between the
two writes: the weights they replace stay as ``prev.safetensors`` (a hard link, no copy where
the file system allows one) until the new state is written, and a load that finds new weights
beside the old state resumes from that previous pair.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fba.errors import DataError, FBAError

WEIGHTS = "last.safetensors"
STATE = "last_state.pt"
#: the weights that the last save replaced, kept until its training state was written too
PREVIOUS_WEIGHTS = "prev.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then rename: a crash never leaves half a file.

    The file gets the permissions a plain ``open`` would give it (``mkstemp``'s are owner-only).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _keep_previous(path: Path, keep: Path) -> None:
    """Make ``keep`` the file ``path`` is now (a hard link, else a copy), atomically."""
    if not path.is_file():
        return
    tmp = keep.with_name(f".{keep.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, keep)


DATA_FACTS = "data_facts"


def save_checkpoint(folder: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], epoch: int,
                    data_facts: dict[str, Any] | None = None) -> None:
    """Write weights, then state; both carry the epoch so a torn pair is detected on load,
    and the replaced weights stay as ``prev.safetensors`` for :func:`load_checkpoint` to fall
    back on.

    ``data_facts`` (``in_channels``, ``num_classes``, ...) are the shape facts the model was
    built from. They go into the weights' metadata, so that exporting or evaluating the run
    later rebuilds the model without reading its dataset, which may have moved.
    """
    from safetensors.torch import save_file

    state = {**state, "epoch": epoch}
    metadata = {"epoch": str(epoch)}
    if data_facts:
        metadata[DATA_FACTS] = json.dumps(data_facts)
    _keep_previous(folder / WEIGHTS, folder / PREVIOUS_WEIGHTS)
    atomic_write(folder / WEIGHTS, lambda p: save_file({k: v.cpu() for k, v in weights.items()}, p, metadata=metadata))
    atomic_write(folder / STATE, lambda p: torch.save(state, p))


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of a run, checked to come from the same epoch.

    Where the run stopped between writing a save's weights and its state, the weights that
    save replaced (``prev.safetensors``) match the state, and the pair they make is returned,
    with a warning: the run resumes from the epoch before.
    """
    import warnings

    weights, metadata = _read_safetensors(folder / WEIGHTS)
    state = load_state(folder / STATE)
    weights_epoch = metadata.get("epoch")
    if weights_epoch == str(state.get("epoch")):
        return weights, state
    previous = folder / PREVIOUS_WEIGHTS
    if previous.is_file():
        earlier, earlier_metadata = _read_safetensors(previous)
        if earlier_metadata.get("epoch") == str(state.get("epoch")):
            warnings.warn(f"{folder}: the run stopped while saving epoch {weights_epoch}; using the complete "
                          f"checkpoint of epoch {state.get('epoch')} ({PREVIOUS_WEIGHTS} and {STATE})", stacklevel=2)
            return earlier, state
    raise DataError(f"checkpoint in {str(folder)!r} is inconsistent: weights from epoch {weights_epoch}, "
                    f"training state from epoch {state.get('epoch')} (the run stopped while saving)")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return _read_safetensors(path)[0]


def load_weights_and_data_facts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A checkpoint's weights and the data facts saved with them (None for older runs)."""
    weights, metadata = _read_safetensors(path)
    facts = metadata.get(DATA_FACTS)
    try:
        return weights, (json.loads(facts) if facts else None)
    except json.JSONDecodeError:
        raise DataError(f"checkpoint {str(path)!r} has corrupt metadata {DATA_FACTS!r}: {facts[:80]!r}") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read in one pass."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"checkpoint {str(path)!r} is corrupt: {error}") from None


@contextlib.contextmanager
def checkpoint_must_fit(where: Path) -> Iterator[None]:
    """Turn a checkpoint that does not match the built learner into a one-line user error.

    Only a mismatch is translated: missing or unexpected keys, or a tensor of another shape.
    Any other failure (out of memory, a device error) propagates as it is, so that it is not
    blamed on the config.
    """
    try:
        yield
    except (ValueError, KeyError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not _is_state_dict_mismatch(error):
            raise
        raise FBAError(f"the checkpoint {str(where)!r} does not fit this config (was a structural key "
                       f"overridden?): {str(error).splitlines()[0]}") from None


def _is_state_dict_mismatch(error: RuntimeError) -> bool:
    # load_state_dict reports missing/unexpected keys and size mismatches in one RuntimeError;
    # copying a tensor of another shape (optimizer state) fails with "size of tensor a".
    if isinstance(error, torch.OutOfMemoryError):
        return False
    text = str(error)
    return "Error(s) in loading state_dict" in text or "size mismatch" in text or "must match the size" in text


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"training state {str(path)!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling fails in many ways on a damaged file
        raise DataError(f"training state {str(path)!r} is corrupt or not a training state: {error}") from None


def init_from_checkpoint(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Initialise ``model`` from another run's weights, e.g. EDSR x3/x4 from a trained x2.

    ``path`` is a run folder, a training checkpoint (``model.*`` keys) or an exported model.
    Every weight transfers except those under the model's ``scale_specific`` prefixes (the
    upsampler), which keep their fresh initialisation. Returns the names left fresh.
    """
    import sys

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / WEIGHTS
    if not path.is_file():
        raise DataError(f"init_from: {str(path)!r} not found (give a run folder or a .safetensors file)")
    weights = load_weights(path)
    if any(k.startswith("model.") for k in weights):
        weights = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    skip = tuple(getattr(model, "scale_specific", ()))
    own = model.state_dict()
    fresh = sorted(k for k in own if k.startswith(skip))
    for name, tensor in own.items():
        if name in fresh:
            continue
        if name not in weights:
            raise DataError(f"init_from: {str(path)!r} has no weight {name!r}; it was trained with another model")
        if weights[name].shape != tensor.shape:
            raise DataError(f"init_from: weight {name!r} has shape {tuple(weights[name].shape)} in {str(path)!r}, "
                            f"this model needs {tuple(tensor.shape)}")
    model.load_state_dict({k: weights[k] for k in own if k not in fresh}, strict=False)
    print(f"initialised {len(own) - len(fresh)} tensors from {path}; {len(fresh)} left fresh "
          f"({', '.join(sorted({k.rsplit('.', 2)[0] for k in fresh})) or 'none'})", file=sys.stderr)
    return fresh
