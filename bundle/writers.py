"""Atomic writers of 2-D maps: NIfTI and PNG.

Each file is written under a temporary name next to its destination and renamed with
``os.replace``, so a reader never sees half a file; the inputs of a run (``protect``) are never
overwritten.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.imagemeta import _as_tensor
from bundle.readers import MammogramError, PathLike, _spacing_pair

__all__ = ["save_nifti_atomic", "save_png_atomic"]


def _refuse_inputs(path: Path, protect: Iterable[PathLike]) -> None:
    target = os.path.realpath(path)
    for p in protect or ():
        if p is None:
            continue
        if os.path.realpath(p) == target or (path.exists() and Path(p).exists() and os.path.samefile(p, path)):
            raise MammogramError(path, "refusing to overwrite an input file")


def _atomic_write(path: Path, suffix: str, write: Any) -> None:
    """Call ``write(tmp)`` on a fresh temporary name next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"  # created by the writer: umask applies
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def save_nifti_atomic(
    array2d: np.ndarray | torch.Tensor,
    path: PathLike,
    spacing: Sequence[float] = (1.0, 1.0),
    protect: Iterable[PathLike] = (),
) -> None:
    """Write a 2-D ``(H, W)`` array to NIfTI as-is (``data[r, c]``), atomically.

    The affine is ``diag(row spacing, col spacing, 1, 1)``. The file is written to a temporary name
    in the same folder and renamed with ``os.replace``; parent folders are created.

    Args:
        array2d: ``(H, W)`` array (a ``(1, H, W)`` array is squeezed). bool is stored as uint8,
            int64 as int32.
        path: ``.nii`` or ``.nii.gz`` destination.
        spacing: (row, col) pixel spacing in mm.
        protect: paths that must never be overwritten (the inputs).

    Raises:
        MammogramError: when ``path`` is one of ``protect``.
        ValueError: for a wrong shape or file name.
    """
    import nibabel as nib

    arr = _as_tensor(array2d).detach().cpu().numpy() if isinstance(array2d, torch.Tensor) else np.asarray(array2d)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"save_nifti_atomic expects a 2-D (H, W) array, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    p = Path(path)
    low = p.name.lower()
    suffix = ".nii.gz" if low.endswith(".nii.gz") else ".nii" if low.endswith(".nii") else None
    if suffix is None:
        raise ValueError(f"NIfTI file name must end with .nii or .nii.gz: {path}")
    _refuse_inputs(p, protect)
    sp = _spacing_pair(spacing)
    if sp is None:
        raise ValueError(f"invalid spacing {spacing!r}")
    img = nib.Nifti1Image(np.ascontiguousarray(arr), np.diag([sp[0], sp[1], 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    _atomic_write(p, suffix, lambda tmp: nib.save(img, tmp))


def save_png_atomic(
    array: np.ndarray | torch.Tensor,
    path: PathLike,
    protect: Iterable[PathLike] = (),
) -> None:
    """Write a uint8 grey ``(H, W)`` or colour ``(H, W, 3|4)`` array to PNG atomically.

    Args:
        array: uint8 array.
        path: destination ``.png``.
        protect: paths that must never be overwritten (the inputs).

    Raises:
        MammogramError: when ``path`` is one of ``protect``.
        ValueError: for a wrong dtype or shape.
    """
    from PIL import Image

    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png_atomic expects uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"save_png_atomic expects (H, W) or (H, W, 3|4), got {arr.shape}")
    p = Path(path)
    _refuse_inputs(p, protect)
    im = Image.fromarray(np.ascontiguousarray(arr))
    _atomic_write(p, ".png", lambda tmp: im.save(tmp, format="PNG"))
