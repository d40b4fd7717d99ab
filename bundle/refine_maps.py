"""The refinement maps of the SegAI microcalcification map, as plain functions, and the inpainting
functions they use.

Inference layer (``docs/architecture.md``). All public functions take 2-D ``(H, W)`` arrays,
either numpy arrays or torch tensors (a leading singleton channel, ``(1, H, W)``, is squeezed),
and return numpy ``float32`` arrays (masks: numpy ``bool``). ``image`` is the normalised
mammogram (breast tissue about [0, 1], calcifications bright), ``segai_prob`` the SegAI
probability map in [0, 1] and ``breast`` an optional breast mask (non-zero = breast).

- SP1 / SP2 (:func:`sp1_gaussian_blur_difference`, :func:`sp2_white_tophat`) and SegAI+R:SP
  (:func:`sp_refine_with_segai`, seed Eq. 2);
- SegAI+R:GenAI (:func:`genai_refine`, seed Eq. 3) and the grid-mask baseline
  (:func:`grid_mask_refine`, seed Table 2), with the difference unit :func:`difference_scale`;
- the :data:`InpaintFn` they call: :func:`classical_inpaint_fn` (biharmonic) and
  :func:`network_inpaint_fn` (the transformer inpainter, :mod:`bundle.inpainting`).

The refiners with a common signature and their registry are in :mod:`bundle.refine`; see
``docs/refinement.md`` for the equations and the normalisation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.morphology import disk, white_tophat
from skimage.restoration import inpaint_biharmonic

from bundle.clusters import dilate_indices
from bundle.inpainting import inpaint_crops, inpaint_tiles
from bundle.utils import as_2d

__all__ = [
    "ArrayLike2D",
    "InpaintFn",
    "to_2d",
    "breast_mask_2d",
    "sp1_gaussian_blur_difference",
    "sp2_white_tophat",
    "sp_refine_with_segai",
    "difference_scale",
    "genai_refine",
    "grid_mask_refine",
    "classical_inpaint_fn",
    "network_inpaint_fn",
]

ArrayLike2D = np.ndarray | torch.Tensor

#: ``inpaint_fn(image, hole) -> virtual``: image ``(H, W)`` float32 numpy without NaN,
#: hole ``(H, W)`` bool numpy (True = fill); returns ``(H, W)`` array (numpy or torch).
InpaintFn = Callable[[np.ndarray, np.ndarray], ArrayLike2D]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def to_2d(x: ArrayLike2D, name: str, dtype: Any = np.float32) -> np.ndarray:
    """numpy / torch -> 2-D numpy of ``dtype`` (:func:`bundle.utils.as_2d`).

    Args:
        x: ``(H, W)`` or ``(1, H, W)`` array or tensor.
        name: its name in error messages.
        dtype: numpy dtype of the result.
    """
    return as_2d(x, name, dtype)


def breast_mask_2d(breast: ArrayLike2D | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Optional breast mask -> bool (H, W), None when absent or empty.

    Args:
        breast: the mask (non-zero = breast), or None.
        shape: the image shape it must have.
    """
    if breast is None:
        return None
    b = to_2d(breast, "breast", bool)
    if b.shape != shape:
        raise ValueError(f"breast shape {b.shape} differs from image shape {shape}.")
    return b if b.any() else None


def _all_finite(a: np.ndarray) -> bool:
    """Whether every value of ``a`` is finite, in one reduction and without a mask: the float64
    sum of finite float32 values cannot overflow, so it is finite exactly when they all are."""
    return bool(np.isfinite(np.sum(a, dtype=np.float64)))


def _sanitize(image: ArrayLike2D, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Replace non-finite pixels by a local mean of finite neighbours (with a warning).

    The local mean is a normalised convolution (box 7, then 31, then the global median for
    what is still unfilled).

    Returns:
        (clean float32 copy, bool mask of the pixels that were non-finite).
    """
    img = to_2d(image, name).copy()
    if _all_finite(img):
        return img, np.zeros(img.shape, dtype=bool)
    bad = ~np.isfinite(img)
    warnings.warn(f"{name} has {int(bad.sum())} non-finite pixel(s); they are replaced by a local mean.", stacklevel=3)
    good = ~bad
    fill = np.where(good, img, 0.0).astype(np.float64)
    todo = bad.copy()
    for size in (7, 31):
        num = ndi.uniform_filter(fill * good, size, mode="constant")
        den = ndi.uniform_filter(good.astype(np.float64), size, mode="constant")
        ok = todo & (den > 1e-6)
        img[ok] = (num[ok] / den[ok]).astype(np.float32)
        todo &= ~ok
    if todo.any():
        img[todo] = float(np.median(img[good])) if good.any() else 0.0
    return img, bad


def _normalise_response(resp: np.ndarray, breast: np.ndarray | None, percentile: float) -> np.ndarray:
    """Clip a non-negative response map to [0, 1] after dividing by a robust high percentile.

    ``prob = clip(resp / P, 0, 1)`` with ``P`` the ``percentile``-th percentile of the
    positive responses inside ``breast`` (whole image if None); 0 outside the breast.
    """
    resp = np.maximum(resp, 0.0)
    region = resp[breast] if breast is not None else resp.ravel()
    region = region[region > 0]
    out = np.zeros_like(resp, dtype=np.float32)
    if region.size == 0:
        return out
    scale = float(np.percentile(region, percentile))
    if scale <= 0:
        scale = float(region.max())
    out = np.clip(resp / scale, 0.0, 1.0).astype(np.float32)
    if breast is not None:
        out[~breast] = 0.0
    return out


# --------------------------------------------------------------------------------------
# signal-processing maps (SP1, SP2) and SegAI+R:SP
# --------------------------------------------------------------------------------------
def sp1_gaussian_blur_difference(
    image: ArrayLike2D,
    sigma_small: float = 0.7,
    sigma_large: float = 4.0,
    breast: ArrayLike2D | None = None,
    percentile: float = 99.5,
) -> np.ndarray:
    """SP1, Gaussian blur difference (GBD): ``G(sigma_small) * I - G(sigma_large) * I``.

    Positive part only (calcifications are bright), normalised by
    ``clip(resp / P, 0, 1)`` where ``P`` is the ``percentile``-th percentile of the positive
    response inside the breast (whole image without ``breast``); 0 outside the breast.
    Non-finite pixels are replaced first (warning) and get 0.

    Args:
        image: ``(H, W)`` numpy or torch image.
        sigma_small: small Gaussian sigma in pixels (denoising).
        sigma_large: large Gaussian sigma in pixels (background estimate).
        breast: optional ``(H, W)`` breast mask.
        percentile: percentile used as the unit of the map.

    Returns:
        ``(H, W)`` float32 map in [0, 1].
    """
    img, bad = _sanitize(image)
    resp = ndi.gaussian_filter(img, sigma_small) - ndi.gaussian_filter(img, sigma_large)
    resp[bad] = 0.0
    return _normalise_response(resp, breast_mask_2d(breast, img.shape), percentile)


def sp2_white_tophat(
    image: ArrayLike2D, radius_px: int = 5, breast: ArrayLike2D | None = None, percentile: float = 99.5
) -> np.ndarray:
    """SP2, white top-hat transform (THT): ``I - opening(I, disk(radius_px))``.

    Keeps bright structures narrower than the disk (``2 * radius_px + 1`` px). The disk is
    decomposed into a sequence of small footprints (skimage), which is fast and close to
    the exact disk. Normalised like :func:`sp1_gaussian_blur_difference`.

    Args:
        image: ``(H, W)`` numpy or torch image.
        radius_px: disk radius in pixels.
        breast: optional ``(H, W)`` breast mask.
        percentile: percentile used as the unit of the map.

    Returns:
        ``(H, W)`` float32 map in [0, 1].
    """
    img, bad = _sanitize(image)
    fp = disk(int(radius_px), decomposition="sequence") if radius_px > 1 else disk(int(radius_px))
    resp = white_tophat(img, footprint=fp).astype(np.float32)
    resp[bad] = 0.0
    return _normalise_response(resp, breast_mask_2d(breast, img.shape), percentile)


def sp_refine_with_segai(
    sp_map: ArrayLike2D, segai_prob: ArrayLike2D, pool_size: int = 9, stride: int = 1
) -> np.ndarray:
    """SegAI+R:SP (seed Eq. 2): weight an SP map by a local average pooling of SegAI.

    ``w = avgpool(segai_prob, pool_size, stride)`` (zero padding; with ``stride > 1`` each
    block's weight is spread back over its pixels), set to exactly 0 wherever no SegAI pixel
    is positive inside the pooling window; ``r = w * sp_map``; the result is divided by its
    maximum so that it spans [0, 1] (all zeros stay zeros). Pixels where the pooled SegAI map
    is 0 therefore stay 0, and inside SegAI-positive neighbourhoods the map follows the SP
    values.

    Args:
        sp_map: ``(H, W)`` SP map in [0, 1].
        segai_prob: ``(H, W)`` SegAI probability.
        pool_size: side of the averaging window in pixels.
        stride: pooling stride (1 = sliding window).

    Returns:
        ``(H, W)`` float32 map in [0, 1].
    """
    sp = np.nan_to_num(to_2d(sp_map, "sp_map"), nan=0.0)
    seg = np.clip(np.nan_to_num(to_2d(segai_prob, "segai_prob"), nan=0.0), 0.0, 1.0)
    if sp.shape != seg.shape:
        raise ValueError(f"sp_map {sp.shape} and segai_prob {seg.shape} differ in shape.")
    if stride <= 1:
        w = ndi.uniform_filter(seg.astype(np.float64), pool_size, mode="constant")
        support = ndi.maximum_filter(seg > 0, pool_size, mode="constant")
        w = np.where(support, np.maximum(w, 0.0), 0.0)
    else:
        h, wd = seg.shape
        pad = ((0, (-h) % stride), (0, (-wd) % stride))
        sp_pad = np.pad(seg, pad)
        pooled = ndi.uniform_filter(sp_pad.astype(np.float64), pool_size, mode="constant")
        support = ndi.maximum_filter(sp_pad > 0, pool_size, mode="constant")
        c = stride // 2
        blocks = np.where(support, np.maximum(pooled, 0.0), 0.0)[c::stride, c::stride]
        w = np.kron(blocks, np.ones((stride, stride)))[:h, :wd]
    out = (w * sp).astype(np.float32)
    m = float(out.max()) if out.size else 0.0
    return out / m if m > 0 else out


# --------------------------------------------------------------------------------------
# generative refinement
# --------------------------------------------------------------------------------------
def difference_scale(
    image: ArrayLike2D, breast: ArrayLike2D | None = None, k_sigma: float = 6.0, sigma_hp: float = 2.0
) -> float:
    """Default unit of the difference map: ``k_sigma`` times the fine-texture noise level.

    ``sigma = 1.4826 * MAD(I - G(sigma_hp) * I)`` inside the breast (whole image without a
    mask), estimated on every other pixel in each direction of row bands (64 rows out of
    every 192 on images taller than 384 rows) for speed. With ``k_sigma = 6`` a
    difference of 3 sigma maps to probability 0.5. A floor of
    ``1e-3 * (P99 - P1)`` of the image (and 1e-6) keeps flat images finite.

    Args:
        image: ``(H, W)`` image without NaN.
        breast: optional breast mask.
        k_sigma: multiple of sigma that maps to probability 1.
        sigma_hp: Gaussian sigma of the high-pass filter, pixels.

    Returns:
        the scale (same units as the image).
    """
    img = to_2d(image, "image")
    b = breast_mask_2d(breast, img.shape)
    vals_l, ivals_l = [], []
    for r, hp in _highpass_bands(img, sigma_hp):  # bands start on even rows
        rows = slice(r, r + hp.shape[0])
        keep = b[rows][::2, ::2] if b is not None else np.ones(hp[::2, ::2].shape, dtype=bool)
        vals_l.append(hp[::2, ::2][keep])
        ivals_l.append(img[rows][::2, ::2][keep])
    vals, ivals = np.concatenate(vals_l), np.concatenate(ivals_l)
    if vals.size == 0:
        vals, ivals = np.concatenate([hp.ravel() for _, hp in _highpass_bands(img, sigma_hp)]), img.ravel()
    sigma = 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
    p1, p99 = np.percentile(ivals, [1, 99])
    floor = max(1e-3 * float(p99 - p1), 1e-6)
    return max(k_sigma * sigma, floor)


def _highpass_bands(img: np.ndarray, sigma: float, band: int = 64, every: int = 192) -> list[tuple[int, np.ndarray]]:
    """``(first_row, img[rows] - G(sigma) * img[rows])`` for row bands of ``band`` rows out
    of every ``every`` (mirrored band borders; the whole image when it is short), so that a
    noise level can be estimated at a fraction of the cost of filtering the whole image."""
    if img.shape[0] <= 2 * every:
        return [(0, img - ndi.gaussian_filter(img, sigma, mode="mirror"))]
    out = []
    for r in range(0, img.shape[0], every):
        sub = img[r : r + band]
        out.append((r, sub - ndi.gaussian_filter(sub, sigma, mode="mirror")))
    return out


def _dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by ``disk(radius)`` as an OR of shifted copies (same result as
    ``ndi.binary_dilation(mask, disk(radius))``, several times faster for small radii)."""
    h, w = mask.shape
    fp = disk(int(radius)).astype(bool)
    if radius >= min(h, w):  # shifts would leave the image: the general routine
        return ndi.binary_dilation(mask, structure=fp)
    out = mask.copy()
    for dy, dx in np.argwhere(fp) - int(radius):
        if dy == 0 and dx == 0:
            continue
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[yd, xd] |= mask[ys, xs]
    return out


def _difference_prob(
    img: np.ndarray,
    virtual: np.ndarray,
    region: np.ndarray,
    scale: float,
    signed: bool,
    breast: np.ndarray | None,
) -> np.ndarray:
    """``clip(diff / scale, 0, 1)`` on ``region`` (and ``breast``), 0 elsewhere; only the
    region's pixels are computed."""
    keep = region if breast is None else (region & breast)
    prob = np.zeros(img.shape, dtype=np.float32)
    idx = np.flatnonzero(keep)
    diff = img.ravel()[idx] - virtual.ravel()[idx]
    diff = np.maximum(diff, 0.0) if signed else np.abs(diff)
    prob.ravel()[idx] = np.clip(diff / scale, 0.0, 1.0)
    return prob


def genai_refine(
    image: ArrayLike2D,
    segai_prob: ArrayLike2D,
    inpaint_fn: InpaintFn,
    threshold: float = 0.5,
    dilation_px: int = 2,
    scale: float | None = None,
    breast: ArrayLike2D | None = None,
    signed: bool = True,
    k_sigma: float = 6.0,
) -> dict[str, Any]:
    """SegAI+R:GenAI (seed Eq. 3): refine SegAI with a virtual normal image.

    1. ``hole = dilate(segai_prob >= threshold, disk(dilation_px))`` (non-finite pixels are
       never in the hole);
    2. ``virtual = inpaint_fn(image, hole)``, kept only inside the hole;
    3. ``diff = max(image - virtual, 0)`` (``signed=True``: calcifications are brighter than
       the tissue they replace) or ``|image - virtual|``;
    4. ``prob = clip(diff / scale, 0, 1)``, 0 outside the hole and outside ``breast``.
       ``scale`` defaults to :func:`difference_scale` (``k_sigma`` times the robust
       fine-texture noise of the image inside the breast).

    Without any SegAI activation the result is all zeros and ``virtual_normal == image``
    (with a warning). Non-finite image pixels are replaced by a local mean (warning), kept
    out of the hole and get probability 0; non-finite SegAI values count as 0.

    Args:
        image: ``(H, W)`` normalised image (numpy or torch).
        segai_prob: ``(H, W)`` SegAI probability (numpy or torch).
        inpaint_fn: see :data:`InpaintFn`, e.g. :func:`network_inpaint_fn` or
            :func:`classical_inpaint_fn`.
        threshold: SegAI binarisation threshold (``>=``).
        dilation_px: radius of the disk the binary mask is dilated by.
        scale: difference that maps to probability 1 (image units); None = automatic.
        breast: optional breast mask.
        signed: keep only positive differences (True) or absolute ones (False).
        k_sigma: multiple of the noise sigma used when ``scale`` is None.

    Returns:
        ``{"prob": float32 (H, W), "virtual_normal": float32 (H, W), "hole": bool (H, W),
        "scale": float}``.
    """
    img = to_2d(image, "image")
    if _all_finite(img):  # the usual case: no copy, no mask of bad pixels
        bad_idx = None
    else:
        img, bad = _sanitize(image)
        bad_idx = np.flatnonzero(bad)
    seg = to_2d(segai_prob, "segai_prob")
    if seg.shape != img.shape:
        raise ValueError(f"segai_prob {seg.shape} and image {img.shape} differ in shape.")
    if not _all_finite(seg):
        warnings.warn("segai_prob has non-finite values; they count as 0.", stacklevel=2)
        seg = np.nan_to_num(seg, nan=0.0, posinf=1.0, neginf=0.0)
    b = breast_mask_2d(breast, img.shape)
    # the hole, sparsely: SegAI marks thousands of pixels of a ten-megapixel view
    hole_idx = dilate_indices(np.flatnonzero(seg >= threshold), img.shape, int(dilation_px))
    if bad_idx is not None and bad_idx.size:
        hole_idx = hole_idx[~np.isin(hole_idx, bad_idx)]
    hole = np.zeros(img.shape, dtype=bool)
    hole.ravel()[hole_idx] = True
    if scale is None:
        scale = difference_scale(img, b, k_sigma=k_sigma)
    if hole_idx.size == 0:
        warnings.warn("genai_refine: SegAI has no activation; the refined map is empty.", stacklevel=2)
        return {"prob": np.zeros(img.shape, np.float32), "virtual_normal": img.copy(), "hole": hole, "scale": float(scale)}
    filled = to_2d(inpaint_fn(img, hole), "virtual")
    virtual = img.astype(np.float32, copy=True)
    virtual.ravel()[hole_idx] = filled.ravel()[hole_idx]
    keep = hole_idx if b is None else hole_idx[b.ravel()[hole_idx]]
    diff = img.ravel()[keep] - virtual.ravel()[keep]
    diff = np.maximum(diff, 0.0) if signed else np.abs(diff)
    prob = np.zeros(img.shape, dtype=np.float32)
    prob.ravel()[keep] = np.clip(diff / float(scale), 0.0, 1.0)
    return {"prob": prob, "virtual_normal": virtual, "hole": hole, "scale": float(scale)}


def grid_mask_refine(
    image: ArrayLike2D,
    inpaint_fn: InpaintFn,
    grid: int = 256,
    context: int | None = None,
    scale: float | None = None,
    breast: ArrayLike2D | None = None,
    signed: bool = True,
    k_sigma: float = 6.0,
    skip_outside_breast: bool = True,
) -> dict[str, Any]:
    """Grid-mask generative baseline (seed Table 2), no SegAI mask.

    The image is cut into ``grid x grid`` cells (border cells clipped to the image); each
    cell in turn is the hole, inpainted from a crop that adds ``context`` pixels on each side
    (default ``grid // 2``); the cells' fills make one virtual normal image; the difference
    is normalised as in :func:`genai_refine` (no hole restriction). With ``breast`` given
    and ``skip_outside_breast``, cells without breast pixels are not inpainted.

    Note: the network fills each cell from context only, so ``grid`` should be well below the
    inpainter's tile (the paper: 256 on 512 patches; for 128-px tiles use ``grid=64``).

    Args:
        image: ``(H, W)`` normalised image.
        inpaint_fn: see :data:`InpaintFn`.
        grid: cell side in pixels.
        context: pixels of context around each cell handed to ``inpaint_fn``.
        scale: difference mapped to probability 1; None = :func:`difference_scale`.
        breast: optional breast mask.
        signed: positive differences only (True) or absolute ones.
        k_sigma: multiple of the noise sigma used when ``scale`` is None.
        skip_outside_breast: skip cells that hold no breast pixel.

    Returns:
        ``{"prob", "virtual_normal", "coverage"}``: ``coverage`` (int16 (H, W)) counts how
        often each pixel was inpainted (1 everywhere unless cells were skipped).
    """
    img, bad = _sanitize(image)
    b = breast_mask_2d(breast, img.shape)
    ctx = grid // 2 if context is None else int(context)
    h, w = img.shape
    virtual = img.copy()
    coverage = np.zeros((h, w), dtype=np.int16)
    for r in range(0, h, grid):
        for c in range(0, w, grid):
            r1, c1 = min(r + grid, h), min(c + grid, w)
            if skip_outside_breast and b is not None and not b[r:r1, c:c1].any():
                continue
            cr0, cc0, cr1, cc1 = max(r - ctx, 0), max(c - ctx, 0), min(r1 + ctx, h), min(c1 + ctx, w)
            crop = img[cr0:cr1, cc0:cc1]
            hole = np.zeros(crop.shape, dtype=bool)
            hole[r - cr0 : r1 - cr0, c - cc0 : c1 - cc0] = True
            filled = to_2d(inpaint_fn(crop, hole), "virtual")
            virtual[r:r1, c:c1] = filled[r - cr0 : r1 - cr0, c - cc0 : c1 - cc0]
            coverage[r:r1, c:c1] += 1
    if scale is None:
        scale = difference_scale(img, b, k_sigma=k_sigma)
    prob = _difference_prob(img, virtual, ~bad, float(scale), signed, b)
    return {"prob": prob, "virtual_normal": virtual, "coverage": coverage, "scale": float(scale)}


# --------------------------------------------------------------------------------------
# inpainting functions
# --------------------------------------------------------------------------------------
def classical_inpaint_fn(method: str = "biharmonic", margin: int = 8) -> InpaintFn:
    """Classical inpainting for the "classical inpainting refinement" baseline.

    Holes are grouped by dilating them by ``margin``; each group is inpainted on its
    bounding box (which already includes ``margin`` pixels of context) with
    ``skimage.restoration.inpaint_biharmonic``, so the cost follows the hole area, not the
    image size.

    Args:
        method: only ``"biharmonic"``.
        margin: context pixels around each hole group.

    Returns:
        an :data:`InpaintFn`.
    """
    if method != "biharmonic":
        raise ValueError(f"Unknown classical inpainting method {method!r}; use 'biharmonic'.")

    def _fn(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        img = to_2d(image, "image")
        hl = to_2d(hole, "hole", bool)
        out = img.copy()
        if not hl.any():
            return out
        groups, _ = ndi.label(ndi.binary_dilation(hl, iterations=margin) if margin > 0 else hl)
        for sl in ndi.find_objects(groups):
            if sl is None:
                continue
            sub_hole = hl[sl]
            if sub_hole.all():  # no context at all: nothing sensible to do but a constant
                out[sl][sub_hole] = float(np.median(img))
                continue
            filled = inpaint_biharmonic(img[sl].astype(np.float64), sub_hole)
            out[sl][sub_hole] = filled[sub_hole].astype(np.float32)
        return out

    return _fn


def network_inpaint_fn(
    net: torch.nn.Module,
    tile: int = 128,
    overlap: float = 0.25,
    batch_size: int = 8,
    device: str = "cpu",
    mode: str = "tiles",
    crop_sizes: Sequence[int] = (32, 64),
    context: int = 8,
) -> InpaintFn:
    """Wrap a trained inpainter (e.g. :class:`bundle.inpainting.MaskAwareInpainter`) as an
    :data:`InpaintFn`.

    Args:
        net: the inpainting network (its device must be ``device``).
        tile: tile side (``"tiles"``), or grid crop side for large holes (``"crops"``).
        overlap: tile overlap fraction.
        batch_size: tiles or crops per network call.
        device: device of the network.
        mode: ``"tiles"`` runs :func:`bundle.inpainting.inpaint_tiles` (a fixed tile grid;
            every tile that holds a hole pixel is inpainted); ``"crops"`` runs
            :func:`bundle.inpainting.inpaint_crops` (small crops centred on the hole
            components; much cheaper when SegAI fires on many small spots).
        crop_sizes: crop sides of ``"crops"``.
        context: known pixels around each crop's interior in ``"crops"``.

    Returns:
        an :data:`InpaintFn` returning numpy float32.
    """
    if mode not in ("tiles", "crops"):
        raise ValueError(f"Unknown inpainting mode {mode!r}; use 'tiles' or 'crops'.")

    def _fn(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        img_t = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)
        hole_t = torch.as_tensor(np.ascontiguousarray(hole)).bool()
        if mode == "crops":
            out = inpaint_crops(
                net, img_t, hole_t, crop_sizes=crop_sizes, context=context, tile=tile, overlap=overlap,
                batch_size=batch_size, device=device,
            )
        else:
            out = inpaint_tiles(net, img_t, hole_t, tile=tile, overlap=overlap, batch_size=batch_size, device=device)
        return out.numpy()

    return _fn
