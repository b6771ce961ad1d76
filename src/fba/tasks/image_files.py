"""Reading image files for any task's datasets: decoded pixels or header sizes, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fba.errors import DataError

# What PIL raises for a truncated, corrupt or hostile file.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError)


def image_error(path: Path, error: BaseException, what: str = "") -> DataError:
    """The one-line error for an image that cannot be read (``what`` adds context, e.g. its annotation)."""
    return DataError(f"cannot read image {path}{what}: {type(error).__name__}: {error}".replace("\n", " "))


def read_image(path: str | Path, what: str = "") -> Tensor:
    """Decode an image file to RGB uint8 ``(3, H, W)``; unreadable files raise a DataError naming them."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image {path}{what} not found") from None
    except (*_UNREADABLE, Image.DecompressionBombError) as error:
        raise image_error(path, error, what) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_size(path: Path, what: str = "") -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise DataError(f"image {path}{what} not found") from None
    except (*_UNREADABLE, Image.DecompressionBombError) as error:
        raise image_error(path, error, what) from None
    return height, width
