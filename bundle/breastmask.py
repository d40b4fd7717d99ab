"""Breast segmentation of an oriented mammogram (chest wall at column 0, bright = dense).

:func:`compute_breast_mask` (Otsu with hysteresis, hole filling, opening, the component at the
chest wall, optionally without the pectoral muscle) and :class:`BreastMaskd`, which also refuses
images without a breast (:func:`large_scale_structure`). The block-mean ``_downsample`` and the
Otsu ``_foreground`` are shared with the orientation in :mod:`bundle.geometry`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from bundle.imagemeta import _as_tensor, _meta_of, _meta_tensor, _path_of
from bundle.loading import check_grey_levels
from bundle.readers import MammogramError, _spacing_pair

__all__ = ["compute_breast_mask", "large_scale_structure", "BreastMaskd"]


def _downsample(arr: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Block-mean downsample so that the longer side is at most ``max_side``; returns (small, factor)."""
    h, w = arr.shape
    f = max(1, math.ceil(max(h, w) / max_side))
    if f == 1:
        return arr.astype(np.float32, copy=False), 1
    hp, wp = math.ceil(h / f) * f, math.ceil(w / f) * f
    pad = np.pad(arr, ((0, hp - h), (0, wp - w)), mode="edge")
    return pad.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32), f


def _foreground(small: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """Otsu foreground of a robustly clipped image; returns (fg, threshold, background level)."""
    from skimage.filters import threshold_otsu

    lo, hi = np.percentile(small, [0.5, 99.5])
    if not hi > lo:
        return None
    clipped = np.clip(small, lo, hi)
    t = float(threshold_otsu(clipped))
    below = clipped[clipped <= t]
    bg = float(np.median(below)) if below.size else float(lo)
    return clipped > t, t, bg


def _fill_holes_chest_wall(mask: np.ndarray) -> np.ndarray:
    """Fill holes, treating the chest-wall column (0) as closed so dark tissue there is filled."""
    padded = np.pad(mask, ((0, 0), (1, 0)), constant_values=True)
    return ndimage.binary_fill_holes(padded)[:, 1:]


def _pectoral_muscle(small: np.ndarray, breast: np.ndarray, margin: int) -> np.ndarray | None:
    """Pectoral muscle (top of the chest-wall side in MLO views) as a straight-edged region, or None."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    rows = np.flatnonzero(breast.any(axis=1))
    if rows.size < 8:
        return None
    r0, r1 = int(rows[0]), int(rows[-1])
    extent = r1 - r0 + 1
    width = int(np.flatnonzero(breast.any(axis=0))[-1]) + 1
    roi = np.zeros_like(breast)
    roi[r0 : r0 + int(0.7 * extent), : max(2, int(0.7 * width))] = True
    roi &= breast
    vals = small[roi]
    if vals.size < 32 or not vals.max() > vals.min():
        return None
    t = threshold_otsu(vals)
    cand = ndimage.binary_opening((small > t) & roi, structure=disk(1))
    # Width of the bright run that starts at the chest wall, row by row from the top. The muscle is
    # a triangle whose width shrinks downwards; where dense tissue joins the run it grows again, so
    # only rows at the running minimum are used to fit the muscle edge.
    rr, widths = [], []
    running = np.inf
    for r in range(r0, r0 + int(0.7 * extent)):
        row = cand[r]
        if not row[:margin].any():
            if rr:
                break
            continue
        start = int(np.flatnonzero(row[:margin])[0])
        stop = np.flatnonzero(~row[start:])
        width_r = int(stop[0]) + start if stop.size else row.size
        if width_r <= running:
            running = width_r
            rr.append(r)
            widths.append(width_r)
    if len(rr) < 4:
        return None
    rr_a, w_a = np.asarray(rr, float), np.asarray(widths, float)
    slope, intercept = np.polyfit(rr_a, w_a, 1)
    resid = np.abs(w_a - (slope * rr_a + intercept))
    keep = resid <= max(2.0, 2.5 * float(np.median(resid)))
    if keep.sum() >= 4:
        slope, intercept = np.polyfit(rr_a[keep], w_a[keep], 1)
    if slope >= 0:  # the muscle edge must run from the top towards the chest wall
        return None
    r_idx, c_idx = np.mgrid[0 : small.shape[0], 0 : small.shape[1]]
    muscle = (c_idx <= slope * r_idx + intercept) & breast & (r_idx >= r0)
    frac = muscle.sum() / max(1, breast.sum())
    if not 0.005 < frac < 0.5:
        return None
    return muscle


def _disk_opening(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological opening by a disk of ``radius`` pixels via Euclidean distance transforms.

    Exact for disks and linear in the image size, unlike a large structuring element.

    Args:
        mask: boolean image.
        radius: disk radius in pixels.
    """
    if radius <= 0 or not mask.any():
        return mask.copy()
    padded = np.pad(mask, 1, constant_values=False)
    eroded = ndimage.distance_transform_edt(padded) > radius
    if not eroded.any():
        return np.zeros_like(mask)
    opened = ndimage.distance_transform_edt(~eroded) <= radius
    return opened[1:-1, 1:-1] & mask


def compute_breast_mask(
    image: np.ndarray | torch.Tensor,
    spacing: float = 0.07,
    exclude_pectoral: bool = False,
    opening_mm: float = 2.0,
    low_fraction: float = 0.3,
    max_side: int = 1024,
    downsampled: tuple[np.ndarray, int] | None = None,
) -> tuple[np.ndarray, bool]:
    """Breast mask of an oriented mammogram (chest wall at column 0, bright = dense).

    Works on a block-mean copy whose longer side is at most ``max_side``: Otsu threshold of the
    robustly clipped image with hysteresis down to ``bg + low_fraction * (otsu - bg)``, hole
    filling, morphological opening, then the largest connected component touching the chest-wall
    side is kept (burned-in text, skin markers and other detached blobs are dropped); falls back to
    the largest component with a warning when none touches column 0.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` image.
        spacing: pixel spacing in mm (sets the opening radius).
        exclude_pectoral: remove the pectoral muscle (top of the chest-wall side).
        opening_mm: radius of the opening in mm.
        low_fraction: hysteresis low threshold as a fraction between background and Otsu level.
        max_side: longer side of the working copy.
        downsampled: the working copy ``(small, factor)`` as ``_downsample(image, max_side)``
            returns it, when the caller already made it (:class:`BreastMaskd` shares it with
            :func:`large_scale_structure`).

    Returns:
        (bool mask ``(H, W)``, whether a pectoral muscle was removed).
    """
    from skimage.filters import apply_hysteresis_threshold
    from skimage.morphology import disk

    arr = _as_tensor(image).detach().cpu().float().numpy()
    arr = arr.reshape(arr.shape[-2:])
    h, w = arr.shape
    small, f = downsampled if downsampled is not None else _downsample(arr, max_side)
    fg = _foreground(small)
    if fg is None:
        return np.zeros((h, w), bool), False
    _, t_high, bg = fg
    lo, hi = np.percentile(small, [0.5, 99.5])
    clipped = np.clip(small, lo, hi)
    t_low = bg + low_fraction * (t_high - bg)
    mask = apply_hysteresis_threshold(clipped, t_low, t_high)
    mask = _fill_holes_chest_wall(mask)
    radius = max(1, round(opening_mm / (spacing * f)))
    radius = min(radius, max(1, min(small.shape) // 16))
    mask = _disk_opening(mask, radius)
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros((h, w), bool), False
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    margin = max(2, round(0.02 * small.shape[1]))
    touching = np.unique(lab[:, :margin])
    touching = touching[touching > 0]
    if touching.size:
        keep = int(touching[np.argmax(sizes[touching])])
    else:
        warnings.warn("no tissue touches the chest-wall side (column 0); keeping the largest region", stacklevel=2)
        keep = int(sizes.argmax())
    mask = _fill_holes_chest_wall(lab == keep)
    removed = False
    if exclude_pectoral:
        muscle = _pectoral_muscle(clipped, mask, margin)
        if muscle is not None:
            mask = mask & ~muscle
            lab, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(lab.ravel())
                sizes[0] = 0
                mask = lab == int(sizes.argmax())
            removed = True
        else:
            warnings.warn("pectoral muscle not found; breast mask left as is", stacklevel=2)
    if f > 1:
        up = F.interpolate(
            torch.from_numpy(mask.astype(np.float32))[None, None],
            size=(small.shape[0] * f, small.shape[1] * f),
            mode="bilinear",
            align_corners=False,
        )[0, 0, :h, :w]
        mask = (up > 0.5).numpy()
    return mask, removed


def large_scale_structure(image: np.ndarray | torch.Tensor, max_side: int = 512) -> float:
    """Share of an image's variance that lies in large-scale structure (0: pure noise, 1: smooth).

    The image is block-averaged to at most ``max_side`` pixels per side and smoothed by a Gaussian
    of 1/64 of that side; the ratio of the smoothed image's variance to the variance before
    smoothing is returned. A breast against its background, or dense tissue filling a spot view,
    keeps most of its variance (phantoms: 0.5 to 0.85); uncorrelated noise keeps about
    ``1 / (4 pi sigma^2)``, i.e. 0.001.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` image.
        max_side: longer side of the working copy.
    """
    arr = _as_tensor(image).detach().cpu().float().numpy()
    arr = arr.reshape(arr.shape[-2:])
    small, _ = _downsample(arr, max_side)
    small = small.astype(np.float64)
    total = float(small.var())
    if not np.isfinite(total) or total <= 0:
        return 0.0
    smooth = ndimage.gaussian_filter(small, sigma=max(small.shape) / 64.0, mode="nearest")
    return float(smooth.var() / total)


class BreastMaskd(MapTransform):
    """Compute the breast mask of ``data[image_key]`` into ``data[out_key]`` (``(1, H, W)`` uint8).

    Expects the chest wall at column 0 (run :class:`OrientBreastd` first). See
    :func:`compute_breast_mask` for the method. The mask carries the image's meta data plus
    ``pectoral_removed``.

    Args:
        image_key: image key.
        out_key: output key.
        exclude_pectoral: remove the pectoral muscle in views listed in ``pectoral_views``.
        pectoral_views: views in which the muscle is visible.
        min_area_fraction: smaller masks (fraction of the image) raise ``MammogramError("empty breast mask")``.
        opening_mm: radius of the morphological opening in mm.
        dtype: output dtype.
        min_structure: images whose :func:`large_scale_structure` is below this raise
            ``MammogramError("no breast found ...")``: noise has about 0.001, mammograms 0.3 and more.
    """

    def __init__(
        self,
        image_key: str = "image",
        out_key: str = "breast",
        exclude_pectoral: bool = False,
        pectoral_views: Sequence[str] = ("MLO", "ML", "LMO", "LM", "SIO"),
        min_area_fraction: float = 0.01,
        opening_mm: float = 2.0,
        dtype: torch.dtype = torch.uint8,
        min_structure: float = 0.02,
    ) -> None:
        super().__init__(image_key, allow_missing_keys=False)
        self.image_key = image_key
        self.out_key = out_key
        self.exclude_pectoral = exclude_pectoral
        self.pectoral_views = tuple(v.upper() for v in pectoral_views)
        self.min_area_fraction = float(min_area_fraction)
        self.opening_mm = float(opening_mm)
        self.dtype = dtype
        self.min_structure = float(min_structure)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the breast mask."""
        d = dict(data)
        img = d[self.image_key]
        meta = _meta_of(img)
        path = _path_of(meta)
        t = _as_tensor(img)
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):  # one reduction
            raise MammogramError(path, "image contains NaN/inf")
        check_grey_levels(meta)
        sp = meta.get("working_spacing") or min(_spacing_pair(meta.get("spacing")) or (0.07, 0.07))
        pect = self.exclude_pectoral and str(meta.get("view", "")).upper() in self.pectoral_views
        arr = t[0].detach().cpu().float().numpy()
        small = _downsample(arr, 1024)  # the mask's working copy; its 2x block mean serves the structure test
        structure = large_scale_structure(small[0])
        if structure < self.min_structure and float(t.max()) > float(t.min()):  # flat: "empty breast mask" below
            raise MammogramError(
                path, f"no breast found: the image has no large-scale structure ({100 * structure:.2f} % of its "
                "variance; noise?); a mammogram is expected",
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask, removed = compute_breast_mask(arr, float(sp), exclude_pectoral=pect, opening_mm=self.opening_mm,
                                                downsampled=small)
        for w in caught:  # name the file in the mask's warnings
            msg = str(w.message)
            warnings.warn(msg if not path or msg.startswith(path) else f"{path}: {msg}", w.category, stacklevel=2)
        if mask.sum() < self.min_area_fraction * mask.size:
            raise MammogramError(path, "empty breast mask (no breast found)")
        meta["pectoral_removed"] = bool(removed)
        affine = img.affine if isinstance(img, MetaTensor) else None
        out = torch.from_numpy(mask[None].astype(np.uint8)).to(self.dtype)
        d[self.out_key] = _meta_tensor(out, affine, meta)
        return d
