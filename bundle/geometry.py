"""Geometry transforms: chest wall to column 0, resampling to the working spacing, and back.

:func:`chest_wall_on_right` / :class:`OrientBreastd` reverse the columns where needed,
:class:`ResampleToSpacingd` resamples to an isotropic working pixel spacing and
:class:`RestoreGeometryd` brings working-grid maps back onto the source pixel grid. Each records
what it did in the meta data (``flip_lr``, ``working_shape``, ``working_spacing``) and keeps the
affine up to date.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

from bundle.breastmask import _downsample, _foreground
from bundle.imagemeta import _affine_with, _as_tensor, _meta_of, _meta_tensor, _path_of, _ref_meta
from bundle.readers import MammogramError, PathLike, _spacing_pair

__all__ = ["chest_wall_on_right", "OrientBreastd", "ResampleToSpacingd", "RestoreGeometryd"]


# ----------------------------------------------------------------------------------------------
# orientation
# ----------------------------------------------------------------------------------------------


def chest_wall_on_right(
    image: np.ndarray | torch.Tensor, laterality: str = "U", method: str = "laterality", path: PathLike | None = None
) -> bool:
    """Decide whether the chest wall is on the right-hand side (high column indices).

    The image content is judged twice: by the breast mass in the two column halves and by the
    image border the tissue touches (a breast lies against the detector edge at the chest wall
    only). When a laterality tag and the image clearly disagree (3x more tissue on the other
    half, or tissue along the other border only) a warning naming the file is issued.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` image, bright = dense.
        laterality: ``"L"``, ``"R"`` or ``"U"``. For presentation images the right breast has
            its chest wall on the right.
        method: ``"laterality"`` (laterality when known, else image content) or ``"intensity"``
            (image content only: breast mass in the left vs right column halves).
        path: the source file, named in the warnings.

    Returns:
        True when the columns must be reversed to bring the chest wall to column 0.
    """
    if method not in ("laterality", "intensity"):
        raise ValueError(f"method must be 'laterality' or 'intensity', got {method!r}")
    arr = _as_tensor(image).detach().cpu().float().numpy()
    arr = arr.reshape(arr.shape[-2:])
    small, _ = _downsample(arr, 512)
    by_image: bool | None = None
    ratio = 1.0
    touch = (0.0, 0.0)  # fraction of rows whose tissue reaches the left / right border
    fg = _foreground(small) if np.isfinite(small).all() else None
    if fg is not None:
        mask, _, bg = fg
        weight = np.clip(small - bg, 0, None) * mask
        w = weight.shape[1]
        left, right = float(weight[:, : w // 2].sum()), float(weight[:, w - w // 2 :].sum())
        by_image = right > left
        ratio = (max(left, right) + 1e-6) / (min(left, right) + 1e-6)
        margin = max(2, round(0.02 * w))
        touch = (float(mask[:, :margin].any(axis=1).mean()), float(mask[:, -margin:].any(axis=1).mean()))
    lat = str(laterality).upper()
    where = f"{path}: " if path else ""
    if method == "laterality" and lat in ("L", "R"):
        by_lat = lat == "R"
        tagged, other = (touch[1], touch[0]) if by_lat else (touch[0], touch[1])
        by_border = tagged < 0.15 and other > 0.35
        if by_image is not None and by_image != by_lat and (ratio > 3.0 or by_border):
            side = "right" if by_lat else "left"
            warnings.warn(
                f"{where}laterality tag {lat} puts the chest wall on the {side}, but the image has its tissue on "
                f"the other side ({ratio:.1f}x more tissue there; it touches the {side} border in "
                f"{100 * tagged:.0f} % of rows, the other border in {100 * other:.0f} %); following the tag, "
                "check the image's laterality",
                stacklevel=2,
            )
        return by_lat
    if by_image is None:
        warnings.warn(f"{where}cannot decide the breast side from a flat image; leaving it as is", stacklevel=2)
        return False
    return by_image


class OrientBreastd(MapTransform):
    """Reverse columns where needed so that the chest wall is at column 0 for all ``keys``.

    The decision is made once on ``data[ref_key]`` (laterality tag ``R`` -> flip, ``L`` -> keep,
    unknown -> compare the breast mass in the two column halves) and applied to every key.
    ``flip_lr`` is stored in the meta data of every key (values that are not MetaTensors become
    MetaTensors carrying the reference meta), and the affine is updated.

    Args:
        keys: keys to flip (image, labels, masks), ``(C, H, W)`` each.
        ref_key: the image that decides.
        method: ``"laterality"`` or ``"intensity"`` (see :func:`chest_wall_on_right`).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "image",
        method: str = "laterality",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if method not in ("laterality", "intensity"):
            raise ValueError(f"method must be 'laterality' or 'intensity', got {method!r}")
        self.ref_key = ref_key
        self.method = method

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Flip the keys (or not) and record ``flip_lr``."""
        d = dict(data)
        ref = d[self.ref_key]
        ref_meta = _meta_of(ref)
        flip = chest_wall_on_right(ref, ref_meta.get("laterality", "U"), self.method, path=_path_of(ref_meta) or None)
        for key in self.key_iterator(d):
            x = d[key]
            meta = _meta_of(x) or dict(ref_meta)
            t = _as_tensor(x)
            affine = x.affine if isinstance(x, MetaTensor) else meta.get("affine")
            if flip:
                t = torch.flip(t, dims=(-1,))
                w = t.shape[-1]
                affine = _affine_with(affine, np.array([[1.0, 0, 0], [0, -1.0, w - 1.0], [0, 0, 1.0]]))
            meta["flip_lr"] = bool(flip)
            d[key] = _meta_tensor(t, affine, meta)
        return d


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------


def _resize(t: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool) -> torch.Tensor:
    """Resize a ``(C, H, W)`` tensor with ``torch.nn.functional.interpolate`` (pixel-centre convention)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    dtype = t.dtype
    m = "nearest-exact" if mode == "nearest" else mode
    x = t.float()[None]
    kwargs: dict[str, Any] = {}
    if m in ("bilinear", "bicubic"):
        down = size[0] < t.shape[-2] or size[1] < t.shape[-1]
        kwargs = {"align_corners": False, "antialias": bool(antialias and down)}
    y = F.interpolate(x, size=size, mode=m, **kwargs)[0]
    if m.startswith("nearest") and not dtype.is_floating_point:
        return y.to(dtype)
    if dtype.is_floating_point:
        return y.to(dtype)
    return y


def _scale_matrix(src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Index transform dst -> src for pixel-centre (align_corners=False) resizing."""
    sr, sc = src[0] / dst[0], src[1] / dst[1]
    return np.array([[sr, 0, 0.5 * sr - 0.5], [0, sc, 0.5 * sc - 0.5], [0, 0, 1.0]])


class ResampleToSpacingd(MapTransform):
    """Resample ``(C, H, W)`` arrays to an isotropic working pixel spacing (mm).

    The current pixel spacing is derived from ``data[ref_key]``'s meta data
    (``spacing`` scaled by ``original_shape`` / current shape). All keys are resampled to the same
    grid with ``torch.nn.functional.interpolate`` (``align_corners=False``; ``"nearest"`` means
    ``"nearest-exact"``). Records ``working_spacing`` and ``working_shape``; nothing is resampled
    when both spacings are within ``tolerance`` of the target.

    Args:
        keys: keys to resample.
        spacing: working spacing in mm.
        mode: interpolation mode, one or one per key (``"bilinear"`` for images, ``"nearest"`` for masks).
        ref_key: key whose meta gives the source spacing and shape.
        antialias: low-pass filter when down-sampling with bilinear/bicubic.
        tolerance: relative spacing difference below which nothing is done.
        max_zoom: refuse (MammogramError) to scale by more than this factor, or by less than its
            inverse: such factors mean the spacing is wrong (e.g. a PNG read at 1 mm).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing: float = 0.07,
        mode: str | Sequence[str] = "bilinear",
        ref_key: str = "image",
        antialias: bool = True,
        tolerance: float = 0.01,
        max_zoom: float = 8.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not spacing > 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        self.spacing = float(spacing)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.ref_key = ref_key
        self.antialias = antialias
        self.tolerance = float(tolerance)
        self.max_zoom = float(max_zoom)

    def _target(self, d: Mapping) -> tuple[tuple[int, int], tuple[int, int], dict]:
        ref = d[self.ref_key]
        meta = _meta_of(ref)
        shape = tuple(int(s) for s in ref.shape[-2:])
        sp = _spacing_pair(meta.get("spacing"))
        if sp is None:
            raise MammogramError(_path_of(meta), "no `spacing` in the meta data; load with LoadMammogramd")
        orig = meta.get("original_shape", shape)
        cur = (sp[0] * orig[0] / shape[0], sp[1] * orig[1] / shape[1])
        if all(abs(c - self.spacing) <= self.tolerance * self.spacing for c in cur):
            return shape, shape, meta
        zoom = max(cur[0], cur[1]) / self.spacing, min(cur[0], cur[1]) / self.spacing
        if zoom[0] > self.max_zoom or zoom[1] < 1.0 / self.max_zoom:
            raise MammogramError(
                _path_of(meta),
                f"resampling from {cur[0]:.4g}x{cur[1]:.4g} mm to {self.spacing} mm pixels would scale the image by "
                f"{zoom[0]:.3g}x; the pixel spacing looks wrong, give the right one with --pixel_spacing (mm)",
            )
        size = (max(1, round(shape[0] * cur[0] / self.spacing)), max(1, round(shape[1] * cur[1] / self.spacing)))
        return shape, size, meta

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample all keys to the working grid."""
        d = dict(data)
        shape, size, ref_meta = self._target(d)
        for key, mode in self.key_iterator(d, self.mode):
            x = d[key]
            t = _as_tensor(x)
            if tuple(t.shape[-2:]) != shape:
                raise ValueError(
                    f"data[{key!r}] has spatial shape {tuple(t.shape[-2:])}, reference {self.ref_key!r} has {shape}"
                )
            meta = _meta_of(x) or dict(ref_meta)
            affine = x.affine if isinstance(x, MetaTensor) else ref_meta.get("affine")
            if size != shape:
                t = _resize(t, size, mode, self.antialias)
                affine = _affine_with(affine, _scale_matrix(shape, size))
            meta["working_spacing"] = self.spacing
            meta["working_shape"] = (int(size[0]), int(size[1]))
            d[key] = _meta_tensor(t, affine, meta)
        return d


# ----------------------------------------------------------------------------------------------
# back to the source grid
# ----------------------------------------------------------------------------------------------


class RestoreGeometryd(MapTransform):
    """Bring working-grid maps back onto the source pixel grid (inverse of resample + flip).

    Each key holds a ``(C, h, w)`` (or ``(h, w)``) map on the working grid of
    ``data[ref_meta_key]``; it is resized to ``original_shape`` and its columns are reversed back
    when ``flip_lr`` is set. Outputs are MetaTensors with the reference meta data and the source
    affine, dtype kept (nearest) or float (bilinear on integers).

    Args:
        keys: maps to restore (probabilities, masks).
        ref_meta_key: key of the preprocessed image (a MetaTensor) or of its meta dict.
        mode: interpolation, one or one per key: ``"bilinear"`` for probabilities, ``"nearest"`` for masks.
        antialias: low-pass filter when down-sampling bilinear maps (off by default so that
            small bright spots keep their peak value).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_meta_key: str = "image",
        mode: str | Sequence[str] = "bilinear",
        antialias: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_meta_key = ref_meta_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.antialias = antialias

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Restore the keys."""
        d = dict(data)
        ref_meta = _ref_meta(d, self.ref_meta_key)
        if "original_shape" not in ref_meta:
            raise KeyError(f"meta data of {self.ref_meta_key!r} has no 'original_shape'")
        target = tuple(int(s) for s in ref_meta["original_shape"])
        flip = bool(ref_meta.get("flip_lr", False))
        orig_affine = ref_meta.get("original_affine")
        for key, mode in self.key_iterator(d, self.mode):
            t = _as_tensor(d[key])
            squeeze = t.ndim == 2
            if squeeze:
                t = t[None]
            if t.ndim != 3:
                raise ValueError(f"data[{key!r}] must be (C, H, W) or (H, W), got shape {tuple(t.shape)}")
            t = _resize(t, target, mode, self.antialias)
            if flip:
                t = torch.flip(t, dims=(-1,))
            meta = dict(ref_meta)
            # the output lies on the source grid: a second restore is a no-op
            meta["restored_flip_lr"] = flip
            meta["restored_from_shape"] = tuple(int(s) for s in ref_meta.get("working_shape", target))
            meta["flip_lr"] = False
            meta["working_shape"] = target
            meta["restored"] = True
            affine = torch.as_tensor(orig_affine, dtype=torch.float64) if orig_affine is not None else None
            out = _meta_tensor(t, affine, meta)
            d[key] = out[0] if squeeze else out
        return d
