"""Reading image files for any task's datasets: decoded pixels or header sizes, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fba.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

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


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder (by suffix, :data:`IMAGE_SUFFIXES`), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(path: str | Path) -> list[tuple[str, Tensor]]:
    """All images of a folder, sorted by file name: ``[(stem, float32 (3, H, W) in [0, 1]), ...]``.

    Used by ``fba eval RUN --images``; the stem names the output file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found")
    files = list_images(folder)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise DataError(f"two images named {file.stem!r} in {folder}: {stems[file.stem].name} and {file.name}")
        stems[file.stem] = file
    return [(file.stem, read_image(file).float() / 255) for file in files]


def save_image(image: Tensor, path: str | Path) -> None:
    """Write a float ``(3, H, W)`` image in [0, 1] as an 8-bit file (PNG by suffix), rounding as the metrics do."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
