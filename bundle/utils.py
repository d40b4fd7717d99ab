"""Small helpers of the bottom (I/O) layer that every other layer uses; each exists once here.

- :func:`as_2d`: numpy/torch array to a 2-D numpy array (the maps of this bundle are 2-D; a
  leading channel or batch axis of size 1 is dropped).
- :func:`atomic_path`: write a file under a temporary name and rename it into place, with the
  permissions the umask gives (``tempfile.mkstemp`` alone would leave it 0600).
- :func:`bundle_version`: the bundle's version from ``configs/metadata.json``.
- :func:`tile_starts`, :func:`iter_tiles`: the regular tile grid of the tiled inferers and the
  inpainter (one definition for both).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["as_2d", "atomic_path", "bundle_version", "iter_tiles", "tile_starts", "umask_mode"]

logger = logging.getLogger("mcref.inference")


def as_2d(x: Any, name: str = "array", dtype: Any = None) -> np.ndarray:
    """``x`` (numpy, torch or MetaTensor) as a 2-D numpy array.

    Args:
        x: the array; leading singleton axes ((1, H, W), (1, 1, H, W)) are dropped.
        name: what it is, for the error message.
        dtype: optional dtype; ``bool`` gives ``x != 0``.

    Raises:
        ValueError: when it is not 2-D after dropping leading singleton axes.
    """
    if hasattr(x, "detach"):  # torch tensor / MetaTensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array (leading singleton axes allowed), got shape {np.shape(x)}.")
    if dtype is bool:
        return arr if arr.dtype == bool else arr != 0
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def umask_mode(base: int = 0o666) -> int:
    """``base`` masked by the process umask (the mode ``open()`` would give a new file)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary file name next to ``path``, renamed to ``path`` on a clean exit.

    On an exception the temporary file is removed and ``path`` is left as it was. The final
    file gets the umask's permissions, like a file written with ``open()``.

    Args:
        path: final destination; its parent folder is created when missing.
        suffix: ending of the temporary name (some writers, e.g. nibabel, pick the format from it).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + suffix, dir=str(dest.parent))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The bundle's version, ``configs/metadata.json#version`` (``"unversioned"`` without one).

    Args:
        bundle_root: the bundle root folder.
    """
    import json

    meta = Path(bundle_root) / "configs" / "metadata.json"
    try:
        return str(json.loads(meta.read_text(encoding="utf-8")).get("version", "unversioned"))
    except (OSError, ValueError):
        logger.warning("%s: no readable metadata; derived objects are marked 'unversioned'", meta)
        return "unversioned"


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``.

    The stride is ``round(tile * (1 - overlap))``; the last tile is shifted inward so that it
    ends exactly at ``length`` (no padding inside the image). When ``length <= tile`` a single
    tile at 0 is returned (the caller pads).

    Args:
        length: image extent along one axis.
        tile: tile extent along that axis.
        overlap: fraction of overlap between neighbouring tiles, in [0, 1).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    stride = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def iter_tiles(shape: Sequence[int], tile: Sequence[int], overlap: float) -> Iterator[tuple[slice, slice]]:
    """Yield ``(row_slice, col_slice)`` for every tile of a 2-D grid (see :func:`tile_starts`).

    Args:
        shape: (H, W) of the (padded) image.
        tile: (th, tw) tile size.
        overlap: fractional overlap between neighbouring tiles.
    """
    for r in tile_starts(shape[0], tile[0], overlap):
        for c in tile_starts(shape[1], tile[1], overlap):
            yield slice(r, r + tile[0]), slice(c, c + tile[1])
