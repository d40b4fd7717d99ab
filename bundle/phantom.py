"""Synthetic full-field digital mammograms (FFDM) with microcalcifications (MCs).

The generator builds a mammogram in the attenuation (log) domain, converts it to detector
counts, adds quantum (Poisson) and electronic (Gaussian) noise and maps the log signal to a
14-bit "for presentation" image in which bright means dense (MONOCHROME2 sense).

Model in one paragraph (details and references in ``docs/phantom.md``):

- geometry: a smooth breast outline (CC: semi-ellipse-like; MLO: axillary tail, pectoral
  muscle triangle in the top chest-wall corner, inframammary fold), chest wall at column 0
  for a left breast (mirrored for the right one);
- thickness: a compressed breast of thickness ``T`` with a semicircular periphery of radius
  ``T/2`` and a skin layer, so the path length (and the signal) falls off towards the skin line
  and the tangential path through the skin gives a bright skin line;
- tissue: fibroglandular density region, anatomical texture with a power-law spectrum
  ``1/f**beta`` (beta ~ 3), clustered lumps, a dense network of curvilinear structures
  (ligaments, ducts) and vessels;
- MCs: ``inject_mcs`` places clusters of round, irregular, rod-like and branching MCs; each
  MC's projected thickness profile ``p`` (pixel averaged, 1 = full thickness) is blurred by a
  Gaussian detector PSF and multiplies the detector signal by ``1 - c * blur(p)``. In the
  bright = dense log domain this is the additive term ``-gain * log(1 - c * blur(p))``.
  The exact label is ``p >= 0.5`` (plus the peak pixel of each MC, so every MC is labelled).

All randomness comes from ``numpy.random.Generator`` objects seeded by the caller.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from bundle.utils import atomic_path

__all__ = [
    "MC_SHAPES",
    "MAX_VALUE_14BIT",
    "mc_profile",
    "inject_mcs",
    "make_phantom",
    "write_mg_dicom",
    "write_label_nifti",
    "make_dataset",
]

MAX_VALUE_14BIT = 16383
MC_SHAPES = ("round", "irregular", "rod", "branching")

# linear attenuation coefficients in 1/mm near 20 keV (adipose, glandular, skin, muscle)
_MU_ADIPOSE = 0.0456
_MU_GLAND = 0.0802
_MU_SKIN = 0.0802
_MU_MUSCLE = 0.08
# effective attenuation of MC material (calcium hydroxyapatite) in 1/mm near 20 keV
_MU_MC = 1.2
# spacing (mm) of the coarse grid on which smooth fields are synthesised
_COARSE_MM = 0.28
# spread (1st to 99th percentile) of a breast in log-attenuation units, used by inject_mcs to
# convert the contrast ``c`` into grey levels when no gain is given (calibrated on phantoms)
_BREAST_LOG_SPREAD = 1.0
# MC morphology of a cluster -> probabilities of the MC shapes in MC_SHAPES order
_MORPHOLOGY = {
    "punctate": (0.75, 0.25, 0.0, 0.0),
    "pleomorphic": (0.3, 0.45, 0.15, 0.1),
    "linear-branching": (0.1, 0.2, 0.35, 0.35),
}
_MORPHOLOGY_P = (0.45, 0.4, 0.15)
_SCT_VIEW = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
_MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
# 5x7 bitmap glyphs for burned-in view labels
_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
}


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """Return ``value`` as an ordered ``(low, high)`` pair.

    Args:
        value: a scalar (low == high) or a pair.
        name: parameter name used in error messages.
    """
    if np.isscalar(value):
        return float(value), float(value)  # type: ignore[arg-type]
    lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    if hi < lo:
        raise ValueError(f"{name}: expected (low, high) with low <= high, got {value}")
    return lo, hi


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Draw from a log-uniform distribution on ``[lo, hi]`` (``lo > 0``).

    Args:
        rng: random generator.
        lo: lower bound.
        hi: upper bound.
    """
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)


def _upsample(a: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Bilinear up-sampling of a coarse grid (pixel centres aligned) to ``shape``.

    Coarse pixel ``i`` covers fine pixels ``[i * factor, (i + 1) * factor)``.

    Args:
        a: coarse 2-D array.
        shape: fine output shape.
        factor: integer ratio between fine and coarse pixel sizes.
    """
    a = np.asarray(a, dtype=np.float32)
    if factor == 1:
        return np.ascontiguousarray(a[: shape[0], : shape[1]])
    h, w = a.shape
    if h < 2 or w < 2:
        a = np.pad(a, ((0, max(0, 2 - h)), (0, max(0, 2 - w))), mode="edge")
        h, w = a.shape
    ys = np.clip((np.arange(shape[0]) + 0.5) / factor - 0.5, 0, h - 1)
    xs = np.clip((np.arange(shape[1]) + 0.5) / factor - 0.5, 0, w - 1)
    y0 = np.minimum(ys.astype(np.intp), h - 2)
    x0 = np.minimum(xs.astype(np.intp), w - 2)
    wy = (ys - y0).astype(np.float32)[:, None]
    wx = (xs - x0).astype(np.float32)
    b = a[:, x0] * (1 - wx) + a[:, x0 + 1] * wx
    out = b[y0] * (1 - wy)
    out += b[y0 + 1] * wy
    return out


def _spectral_noise(
    shape: tuple[int, int],
    spacing: float,
    rng: np.random.Generator,
    beta: float | None = None,
    sigma_mm: float | None = None,
    f_min: float = 0.01,
    anisotropy: tuple[float, float] | None = None,
) -> np.ndarray:
    """Gaussian random field with unit variance, shaped in the Fourier domain.

    Either a power law ``P(f) ~ (f**2 + f_min**2) ** (-beta / 2)`` (anatomical noise) or a
    Gaussian low-pass of width ``sigma_mm`` (smooth fields), optionally stretched.

    Args:
        shape: output shape.
        spacing: pixel size in mm.
        rng: random generator.
        beta: power-law exponent; used when given.
        sigma_mm: spatial correlation (Gaussian kernel sigma) in mm; used when beta is None.
        f_min: low-frequency cut-off of the power law in cycles/mm.
        anisotropy: ``(ratio, angle)``: stretch the correlation by ``ratio`` along ``angle``
            (radians, measured from the column axis towards increasing rows).
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = np.fft.rfft2(white)
    fy = np.fft.fftfreq(shape[0], d=spacing)[:, None]
    fx = np.fft.rfftfreq(shape[1], d=spacing)[None, :]
    if anisotropy is not None:
        ratio, ang = anisotropy
        ca, sa = math.cos(ang), math.sin(ang)
        fu = fx * ca + fy * sa
        fv = -fx * sa + fy * ca
        f2 = (fu * ratio) ** 2 + fv**2
    else:
        f2 = fx**2 + fy**2
    if beta is not None:
        amp = (f2 + f_min**2) ** (-beta / 4.0)
    else:
        amp = np.exp(-2.0 * math.pi**2 * float(sigma_mm) ** 2 * f2)
    amp[0, 0] = 0.0
    field = np.fft.irfft2(spec * amp, s=shape).astype(np.float32)
    std = float(field.std())
    return field / std if std > 0 else field


def _signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance (mm) to the mask border: positive inside, negative outside.

    Args:
        mask: boolean 2-D mask.
        spacing: pixel size in mm.
    """
    inside = ndi.distance_transform_edt(mask, sampling=spacing)
    outside = ndi.distance_transform_edt(~mask, sampling=spacing)
    return np.where(mask, inside - 0.5 * spacing, -(outside - 0.5 * spacing)).astype(np.float32)


def _segment_distance(y: np.ndarray, x: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of points ``(y, x)`` to the segment ``p0 -> p1`` (same units).

    Args:
        y: row coordinates.
        x: column coordinates.
        p0: segment start ``(row, col)``.
        p1: segment end ``(row, col)``.
    """
    dy, dx = p1[0] - p0[0], p1[1] - p0[1]
    ll = dy * dy + dx * dx
    if ll <= 0:
        return np.hypot(y - p0[0], x - p0[1])
    t = np.clip(((y - p0[0]) * dy + (x - p0[1]) * dx) / ll, 0.0, 1.0)
    return np.hypot(y - (p0[0] + t * dy), x - (p0[1] + t * dx))


# ----------------------------------------------------------------------------------------
# MC image-formation model
# ----------------------------------------------------------------------------------------
def mc_profile(
    shape: str,
    diameter_px: float,
    rng: np.random.Generator,
    offset: tuple[float, float] = (0.0, 0.0),
    min_width_px: float = 0.8,
    supersample: int = 7,
) -> np.ndarray:
    """Pixel-averaged, normalised projected thickness of one MC on a small odd-sized patch.

    The MC's centre lies at ``(n // 2 + offset[0], n // 2 + offset[1])`` of the ``n x n``
    patch. Values are in ``[0, 1]``; 1 means the full thickness of the MC (sphere centre,
    axis of a rod or branch). Each pixel value is the mean over ``supersample**2`` sub-pixel
    samples, so partial-volume effects of tiny MCs are modelled.

    Args:
        shape: one of ``MC_SHAPES``: "round" (slightly elliptical sphere projection),
            "irregular" (radius modulated by random harmonics), "rod" (capsule, length =
            diameter) or "branching" (a main capsule with one or two side branches).
        diameter_px: largest extent of the MC in pixels.
        rng: random generator (orientation and shape details).
        offset: sub-pixel position of the centre, each in ``[-0.5, 0.5)``.
        min_width_px: smallest rod/branch width in pixels.
        supersample: sub-samples per pixel along each axis.
    """
    if shape not in MC_SHAPES:
        raise ValueError(f"unknown MC shape {shape!r}; expected one of {MC_SHAPES}")
    d = max(float(diameter_px), 0.2)
    r = d / 2.0
    half = int(math.ceil(r + 1.0))
    n = 2 * half + 1
    sub = (np.arange(n * supersample) + 0.5) / supersample - 0.5
    y = (sub - half - offset[0])[:, None]
    x = (sub - half - offset[1])[None, :]
    theta = rng.uniform(0, math.pi)
    ct, st = math.cos(theta), math.sin(theta)
    u = x * ct + y * st
    v = -x * st + y * ct
    if shape == "round":
        ecc = rng.uniform(0.75, 1.0)
        t = np.sqrt(np.clip(1.0 - (u / r) ** 2 - (v / (r * ecc)) ** 2, 0.0, None))
    elif shape == "irregular":
        rho = np.hypot(u, v)
        phi = np.arctan2(v, u)
        ks = np.arange(2, 6)
        amps = rng.uniform(0.0, 0.3, size=ks.size) / np.sqrt(ks)
        phases = rng.uniform(0, 2 * math.pi, size=ks.size)
        grid = np.linspace(-math.pi, math.pi, 361)
        rf_grid = 1.0 + (amps[:, None] * np.cos(ks[:, None] * grid[None] + phases[:, None])).sum(0)
        rf = 1.0 + (amps[:, None, None] * np.cos(ks[:, None, None] * phi[None] + phases[:, None, None])).sum(0)
        rf = r * rf / rf_grid.max()
        t = np.sqrt(np.clip(1.0 - (rho / np.maximum(rf, 1e-6)) ** 2, 0.0, None))
    else:
        frac = (0.25, 0.45) if shape == "rod" else (0.18, 0.3)
        w = max(d * rng.uniform(*frac), min(min_width_px, d))
        hw = w / 2.0
        length = max(d - w, 0.0)
        p0 = np.array([0.0, -length / 2.0])
        p1 = np.array([0.0, length / 2.0])
        dist = _segment_distance(v, u, p0, p1)
        if shape == "branching" and length > 0:
            sides = [1.0] if rng.random() < 0.5 else [1.0, -1.0]
            for side in sides:
                lam = rng.uniform(0.25, 0.7)
                base = p0 + lam * (p1 - p0)
                ang = side * math.radians(rng.uniform(25, 60))
                blen = rng.uniform(0.35, 0.6) * length
                tip = base + blen * np.array([math.sin(ang), math.cos(ang)])
                dist = np.minimum(dist, _segment_distance(v, u, base, tip))
        t = np.sqrt(np.clip(1.0 - (dist / hw) ** 2, 0.0, None))
    return t.reshape(n, supersample, n, supersample).mean(axis=(1, 3)).astype(np.float32)


def _block_allowed(allowed: np.ndarray, block: int) -> np.ndarray:
    """Coarse map: True where a whole ``block x block`` tile of ``allowed`` is True.

    Args:
        allowed: boolean full-resolution mask.
        block: tile size in pixels.
    """
    hb, wb = allowed.shape[0] // block, allowed.shape[1] // block
    if hb == 0 or wb == 0:
        return np.zeros((max(hb, 1), max(wb, 1)), dtype=bool)
    tiles = allowed[: hb * block, : wb * block].reshape(hb, block, wb, block)
    return tiles.all(axis=(1, 3))


def _plan_cluster(
    centre: np.ndarray,
    allowed: np.ndarray,
    spacing: float,
    rng: np.random.Generator,
    contrast: tuple[float, float],
    diameter_mm: tuple[float, float],
    mcs_per_cluster: tuple[int, int],
    extent: float,
) -> dict[str, Any]:
    """Place the MCs of one cluster around ``centre`` (no pixels are changed yet).

    Returns a dict with the cluster description and, under ``"_patches"``, the rendered
    profile patches ``(row0, col0, profile)`` of the accepted MCs.

    Args:
        centre: cluster centre ``(row, col)`` in pixels.
        allowed: boolean mask of pixels where MC pixels may lie.
        spacing: pixel size in mm.
        rng: random generator.
        contrast: range of the MC contrast ``c``.
        diameter_mm: range of MC diameters in mm.
        mcs_per_cluster: range of the number of MCs (inclusive).
        extent: cluster extent (largest diameter of the cluster ellipse) in mm.
    """
    lo_n, hi_n = mcs_per_cluster
    n_target = int(round(_loguniform(rng, max(lo_n, 1), max(hi_n, 1))))
    n_target = int(np.clip(n_target, lo_n, hi_n))
    names = list(_MORPHOLOGY)
    morphology = names[int(rng.choice(len(names), p=_MORPHOLOGY_P))]
    probs = np.asarray(_MORPHOLOGY[morphology])
    d_lo, d_hi = diameter_mm
    d_cl = _loguniform(rng, d_lo, d_hi)
    d_cl = min(d_cl, max(d_lo, 0.5 * extent / math.sqrt(max(n_target, 1))))
    c_lo, c_hi = contrast
    # per-cluster factor for MC density/composition and scatter (see c_mc below)
    kappa = _loguniform(rng, 0.4, 1.0)
    semi_a = extent / 2.0 / spacing
    semi_b = semi_a * rng.uniform(0.4, 1.0)
    psi = rng.uniform(0, math.pi)
    placed: list[tuple[float, float, float]] = []
    mcs: list[dict[str, Any]] = []
    patches: list[tuple[int, int, np.ndarray]] = []
    h, w = allowed.shape
    for _ in range(n_target):
        for _try in range(40):
            rad = math.sqrt(rng.random())
            ang = rng.uniform(0, 2 * math.pi)
            eu, ev = rad * semi_a * math.cos(ang), rad * semi_b * math.sin(ang)
            cy = float(centre[0] + eu * math.sin(psi) + ev * math.cos(psi))
            cx = float(centre[1] + eu * math.cos(psi) - ev * math.sin(psi))
            d_mm = float(np.clip(d_cl * math.exp(rng.normal(0.0, 0.3)), d_lo, d_hi))
            d_px = d_mm / spacing
            if any(math.hypot(cy - py, cx - px) < (d_px + pd) / 2.0 + 1.0 for py, px, pd in placed):
                continue
            iy, ix = int(round(cy)), int(round(cx))
            shape = MC_SHAPES[int(rng.choice(len(MC_SHAPES), p=probs))]
            prof = mc_profile(shape, d_px, rng, offset=(cy - iy, cx - ix), min_width_px=0.07 / spacing)
            half = prof.shape[0] // 2
            r0, c0 = iy - half, ix - half
            r1, c1 = r0 + prof.shape[0], c0 + prof.shape[1]
            if r0 < 0 or c0 < 0 or r1 > h or c1 > w:
                continue
            if not np.all(allowed[r0:r1, c0:c1][prof > 0]):
                continue
            # contrast grows with the MC thickness: 1 - exp(-mu * d), mu ~ 1.2/mm for
            # calcium hydroxyapatite near 20 keV, scaled by kappa, clipped to the range
            c_mc = kappa * (1.0 - math.exp(-_MU_MC * d_mm)) * math.exp(rng.normal(0.0, 0.2))
            c_mc = float(np.clip(c_mc, c_lo, c_hi))
            placed.append((cy, cx, d_px))
            patches.append((r0, c0, prof))
            mcs.append({"centre": [cy, cx], "diameter_mm": d_mm, "shape": shape, "contrast": c_mc})
            break
    if mcs:
        centre_out = [float(np.mean([m["centre"][0] for m in mcs])), float(np.mean([m["centre"][1] for m in mcs]))]
    else:
        centre_out = [float(centre[0]), float(centre[1])]
    return {
        "centre": centre_out,
        "extent_mm": float(extent),
        "morphology": morphology,
        "mcs": mcs,
        "_patches": patches,
    }


def inject_mcs(
    image: np.ndarray,
    breast: np.ndarray,
    spacing: float,
    rng: np.random.Generator,
    n_clusters: int | Sequence[int] = (1, 3),
    contrast: float | Sequence[float] = (0.05, 0.35),
    diameter_mm: float | Sequence[float] = (0.1, 0.7),
    mcs_per_cluster: int | Sequence[int] = (3, 30),
    cluster_extent_mm: float | Sequence[float] = (2.0, 10.0),
    avoid: np.ndarray | None = None,
    *,
    gain: float | None = None,
    psf_sigma_px: float | Sequence[float] = (0.5, 0.7),
    margin_mm: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Insert clusters of synthetic MCs into a bright = dense image (exact labels).

    Image-formation model: each MC has a pixel-averaged normalised projected thickness
    profile ``p`` (see :func:`mc_profile`); ``p`` is blurred by a Gaussian detector PSF and
    attenuates the detector signal multiplicatively, ``raw_out = raw * (1 - c * blur(p))``.
    For a bright = dense (log-like) image this is the additive term
    ``image_out = image - gain * log(1 - c * blur(p))``. The label is ``p >= 0.5`` plus the
    peak pixel of every MC, so each MC (also a 0.1 mm one) owns at least one label pixel.
    MC pixels (``p > 0``) lie inside ``breast``, outside ``avoid`` and at least ``margin_mm``
    (cluster centres: ``margin_mm`` plus a quarter of the extent) from their border.

    Args:
        image: 2-D image, bright = dense (raw 14/16-bit, or 8-bit scaled), any real dtype.
        breast: 2-D mask (non-zero = breast) of the same shape.
        spacing: pixel size in mm.
        rng: random generator; the result depends only on it and the inputs.
        n_clusters: number of clusters, an int or an inclusive ``(low, high)`` range.
        contrast: range of the MC contrast ``c`` (fraction of the raw signal removed at full
            MC thickness). Within the range, ``c = kappa * (1 - exp(-1.2 / mm * d))`` grows
            with the MC diameter ``d``; ``kappa`` (log-uniform in [0.4, 1] per cluster:
            MC density, scatter) and a per-MC factor ``exp(N(0, 0.2))`` make faint and
            bright clusters. A scalar gives that contrast exactly.
        diameter_mm: range of MC diameters (largest extent) in mm.
        mcs_per_cluster: inclusive range of the number of MCs per cluster (log-uniform).
        cluster_extent_mm: range of the cluster extent in mm.
        avoid: optional 2-D mask of regions to keep free of MCs (masses, pectoral muscle).
        gain: grey levels per unit of log attenuation. ``None`` estimates it as the spread
            (99th - 1st percentile) of the breast pixels divided by a typical breast spread
            of 1.0 log unit, which matches the phantom of :func:`make_phantom`.
        psf_sigma_px: Gaussian PSF sigma in pixels, a value or a range drawn once per call.
        margin_mm: minimum distance of MC pixels to the border of the allowed region.

    Returns:
        ``(image_out, label, clusters)``: ``float32`` image, ``uint8`` 0/1 label, and a list
        of clusters ``{"centre": [row, col], "extent_mm", "morphology", "mcs": [{"centre",
        "diameter_mm", "shape", "contrast", "label_pixels"}]}``. Fewer clusters than asked
        are returned when the allowed region is too small.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"inject_mcs expects a 2-D image, got shape {img.shape}")
    if breast.shape != img.shape:
        raise ValueError(f"breast mask shape {breast.shape} differs from image shape {img.shape}")
    if avoid is not None and avoid.shape != img.shape:
        raise ValueError(f"avoid mask shape {avoid.shape} differs from image shape {img.shape}")
    out = img.astype(np.float32, copy=True)
    label = np.zeros(img.shape, dtype=np.uint8)
    breast_b = np.asarray(breast) > 0
    allowed = breast_b if avoid is None else breast_b & ~(np.asarray(avoid) > 0)
    if gain is None:
        vals = out[breast_b]
        if vals.size == 0:
            return out, label, []
        if vals.size > 2_000_000:
            vals = vals[:: vals.size // 1_000_000]
        p1, p99 = np.percentile(vals, [1.0, 99.0])
        gain = max(float(p99 - p1), 1e-6) / _BREAST_LOG_SPREAD
    n_lo, n_hi = (int(v) for v in _pair(n_clusters, "n_clusters"))
    m_lo, m_hi = (int(v) for v in _pair(mcs_per_cluster, "mcs_per_cluster"))
    c_rng = _pair(contrast, "contrast")
    if not 0 <= c_rng[0] and c_rng[1] < 1:
        raise ValueError(f"contrast must lie in [0, 1), got {contrast}")
    d_rng = _pair(diameter_mm, "diameter_mm")
    e_rng = _pair(cluster_extent_mm, "cluster_extent_mm")
    s_lo, s_hi = _pair(psf_sigma_px, "psf_sigma_px")
    sigma = float(rng.uniform(s_lo, s_hi)) if s_hi > s_lo else s_lo
    k = int(rng.integers(n_lo, n_hi + 1))

    # coarse (1 mm) map of admissible cluster centres with the distance to the border
    block = max(1, int(round(1.0 / spacing)))
    tiles = np.pad(_block_allowed(allowed, block), 1)
    dist_mm = ndi.distance_transform_edt(tiles)[1:-1, 1:-1] * block * spacing
    clusters: list[dict[str, Any]] = []
    for _ in range(k):
        for _try in range(25):
            extent = float(rng.uniform(*e_rng))
            need = margin_mm + extent / 4.0
            cand = np.argwhere(dist_mm >= need)
            if cand.size == 0:
                cand = np.argwhere(dist_mm >= margin_mm + block * spacing)
            if cand.size == 0:
                break
            ty, tx = cand[int(rng.integers(len(cand)))]
            centre = np.array([(ty + rng.random()) * block, (tx + rng.random()) * block])
            if any(
                math.hypot(centre[0] - c["centre"][0], centre[1] - c["centre"][1]) * spacing
                < (extent + c["extent_mm"]) / 2.0 + 2.0
                for c in clusters
            ):
                continue
            inner = allowed if margin_mm <= 0 else _erode_mm(allowed, centre, extent, margin_mm, spacing)
            cl = _plan_cluster(centre, inner, spacing, rng, c_rng, d_rng, (m_lo, m_hi), extent)
            if len(cl["mcs"]) >= max(1, min(3, m_lo)):
                clusters.append(cl)
                break
    pad = int(math.ceil(3.0 * sigma)) + 1 if sigma > 0 else 0
    h, w = out.shape
    for cl in clusters:
        for mc, (r0, c0, prof) in zip(cl["mcs"], cl.pop("_patches")):
            padded = np.pad(prof, pad) if pad else prof
            blurred = ndi.gaussian_filter(padded, sigma, mode="constant") if sigma > 0 else padded
            delta = -float(gain) * np.log1p(-mc["contrast"] * blurred)
            rr0, cc0 = r0 - pad, c0 - pad
            ys, xs = max(rr0, 0), max(cc0, 0)
            ye, xe = min(rr0 + delta.shape[0], h), min(cc0 + delta.shape[1], w)
            out[ys:ye, xs:xe] += delta[ys - rr0 : ye - rr0, xs - cc0 : xe - cc0]
            lab = prof >= 0.5
            lab.flat[int(np.argmax(prof))] = True
            label[r0 : r0 + prof.shape[0], c0 : c0 + prof.shape[1]] |= lab.astype(np.uint8)
            mc["label_pixels"] = int(lab.sum())
    return out, label, clusters


def _erode_mm(allowed: np.ndarray, centre: np.ndarray, extent: float, margin_mm: float, spacing: float) -> np.ndarray:
    """Allowed mask eroded by ``margin_mm``, computed only in a window around a cluster.

    Args:
        allowed: boolean full-resolution mask.
        centre: cluster centre ``(row, col)`` in pixels.
        extent: cluster extent in mm.
        margin_mm: erosion distance in mm.
        spacing: pixel size in mm.
    """
    h, w = allowed.shape
    rad = int(math.ceil((extent / 2.0 + margin_mm + 2.0) / spacing))
    y0, y1 = max(int(centre[0]) - rad, 0), min(int(centre[0]) + rad + 1, h)
    x0, x1 = max(int(centre[1]) - rad, 0), min(int(centre[1]) + rad + 1, w)
    win = np.pad(allowed[y0:y1, x0:x1], 1)
    inner = ndi.distance_transform_edt(win, sampling=spacing)[1:-1, 1:-1] >= margin_mm
    out = np.zeros_like(allowed, dtype=bool)
    out[y0:y1, x0:x1] = inner
    return out


# ----------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------
def _outline(view: str, rows: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Column of the skin line for every row (canonical orientation: chest wall at column 0).

    Args:
        view: "CC" or "MLO".
        rows: row coordinates (fine pixel units, may be fractional).
        height: image rows.
        width: image columns.
        rng: random generator.
    """
    if view == "MLO":
        x_top = width * rng.uniform(0.3, 0.5)
        depth = width * rng.uniform(0.72, 0.9)
        y_max = height * rng.uniform(0.5, 0.65)
        y_end = height * rng.uniform(0.9, 1.04)
        q = rng.uniform(0.8, 1.2)
        p = rng.uniform(1.8, 2.4)
        up = x_top + (depth - x_top) * np.sin(0.5 * math.pi * np.clip(rows / y_max, 0, 1)) ** q
        wv = np.clip((rows - y_max) / (y_end - y_max), 0, 1)
        low = depth * np.clip(1.0 - wv**p, 0, None) ** (1.0 / p)
        xb = np.where(rows <= y_max, up, low)
        u = rows / height * 2.0 - 1.0
    else:
        depth = width * rng.uniform(0.72, 0.92)
        yc = height * rng.uniform(0.46, 0.54)
        b_top = height * rng.uniform(0.5, 0.65)
        b_bot = height * rng.uniform(0.5, 0.65)
        p = rng.uniform(1.8, 2.6)
        u = (rows - yc) / np.where(rows < yc, b_top, b_bot)
        xb = depth * np.clip(1.0 - np.abs(u) ** p, 0, None) ** (1.0 / p)
    pert = np.ones_like(rows, dtype=np.float64)
    for kk in range(1, 4):
        pert += rng.uniform(-0.025, 0.025) * np.sin(kk * math.pi * (u + 1) / 2 + rng.uniform(0, 2 * math.pi))
    return np.clip(xb * pert, 0, None)


def _pectoral(
    rows: np.ndarray, height: int, width: int, x_limit: float, rng: np.random.Generator
) -> tuple[np.ndarray, float, float]:
    """Column of the pectoral muscle border for every row (MLO, canonical orientation).

    Returns ``(border, x_p, y_p)``: border column per row, width at the top row and height
    at the chest wall.

    Args:
        rows: row coordinates.
        height: image rows.
        width: image columns.
        x_limit: the pectoral must stay left of this column at the top row.
        rng: random generator.
    """
    x_p = min(width * rng.uniform(0.2, 0.35), 0.8 * x_limit)
    y_p = height * rng.uniform(0.38, 0.62)
    q = rng.uniform(0.95, 1.35)
    border = x_p * np.clip(1.0 - np.clip(rows / y_p, 0, None) ** q, 0, None) ** (1.0 / q)
    return border, x_p, y_p


def _foam(
    coarse_shape: tuple[int, int],
    sl: float,
    rng: np.random.Generator,
    cell_mm: float,
    direction: float = 0.0,
    stretch: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distance to the edges of a warped Voronoi foam, as a locally linear field.

    The edges model the septa (Cooper's ligaments) around fat lobules. For every coarse
    pixel the distance ``d`` (mm, >= 0) to the bisector of its two nearest seeds and the
    gradient of that bisector distance (per coarse pixel) are returned, so that the exact
    distance can be extrapolated to fine pixels with :func:`_linear_upsample`, without
    interpolating across edges.

    Returns ``(d, grad_row, grad_col, cell_index)``.

    Args:
        coarse_shape: coarse grid shape.
        sl: coarse pixel size in mm.
        rng: random generator.
        cell_mm: typical cell size in mm.
        direction: angle (radians, from the column axis towards increasing rows) along
            which cells are elongated, e.g. from the chest wall to the nipple.
        stretch: elongation ratio of the cells along ``direction``.
    """
    from scipy.spatial import cKDTree

    h, w = coarse_shape
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) * sl
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) * sl
    if stretch != 1.0:
        ca, sa = math.cos(direction), math.sin(direction)
        along = (xx * ca + yy * sa) / math.sqrt(stretch)
        across = (-xx * sa + yy * ca) * math.sqrt(stretch)
        yy, xx = across, along
    yy = np.broadcast_to(yy, (h, w))
    xx = np.broadcast_to(xx, (h, w))
    y0, x0 = float(yy.min()), float(xx.min())
    gy = np.arange(-1.0, (float(yy.max()) - y0) / cell_mm + 2.0)
    gx = np.arange(-1.0, (float(xx.max()) - x0) / cell_mm + 2.0)
    seeds = np.stack(np.meshgrid(gy, gx, indexing="ij"), -1).reshape(-1, 2)
    seeds = (seeds + rng.uniform(-0.5, 0.5, size=seeds.shape)) * cell_mm + np.array([y0, x0])
    warp = 0.45 * cell_mm
    qy = yy + warp * _spectral_noise(coarse_shape, sl, rng, sigma_mm=1.2 * cell_mm)
    qx = xx + warp * _spectral_noise(coarse_shape, sl, rng, sigma_mm=1.2 * cell_mm)
    # distance to the cell border = min over the neighbour seeds of the bisector distance
    dist, idx = cKDTree(seeds).query(np.stack([qy.ravel(), qx.ravel()], 1), k=4)
    own = seeds[idx[:, 0]]
    best_d = np.full(idx.shape[0], np.inf)
    best_n = np.zeros((idx.shape[0], 2))
    for j in range(1, idx.shape[1]):
        diff = own - seeds[idx[:, j]]
        sep = np.maximum(np.linalg.norm(diff, axis=1), 1e-6)
        dj = (dist[:, j] ** 2 - dist[:, 0] ** 2) / (2.0 * sep)
        better = dj < best_d
        best_d = np.where(better, dj, best_d)
        best_n[better] = diff[better] / sep[better, None]
    d = best_d.reshape(h, w)
    ny, nx = best_n[:, 0].reshape(h, w), best_n[:, 1].reshape(h, w)
    # chain rule through the warp: gradient of d per coarse pixel step
    qyy, qyx = np.gradient(qy)
    qxy, qxx = np.gradient(qx)
    g_row = ny * qyy + nx * qxy
    g_col = ny * qyx + nx * qxx
    f32 = np.float32
    return d.astype(f32), g_row.astype(f32), g_col.astype(f32), idx[:, 0].reshape(h, w)


def _linear_upsample(
    value: np.ndarray, g_row: np.ndarray, g_col: np.ndarray, shape: tuple[int, int], factor: int
) -> np.ndarray:
    """Evaluate a per-coarse-pixel linear model ``value + grad . offset`` on the fine grid.

    Each fine pixel uses the model of the coarse pixel it lies in (no interpolation across
    coarse pixels, so distances to edges stay exact on both sides of an edge).

    Args:
        value: coarse values at the coarse pixel centres.
        g_row: coarse gradients along rows (value change per coarse pixel).
        g_col: coarse gradients along columns.
        shape: fine shape.
        factor: coarse grid factor.
    """
    ri = np.arange(shape[0]) // factor
    ci = np.arange(shape[1]) // factor
    off = ((np.arange(factor) + 0.5) / factor - 0.5).astype(np.float32)
    dr = np.tile(off, shape[0] // factor + 1)[: shape[0], None]
    dc = np.tile(off, shape[1] // factor + 1)[None, : shape[1]]
    out = value[ri][:, ci]
    out += g_row[ri][:, ci] * dr
    out += g_col[ri][:, ci] * dc
    return out


def _vessels(
    coarse_mask: np.ndarray,
    sl: float,
    rng: np.random.Generator,
    nipple_c: tuple[float, float],
    crossing: bool,
) -> tuple[np.ndarray, list[list[float]]]:
    """Vessel attenuation map on the coarse grid (glandular-equivalent units).

    Vessels start near the chest wall and meander towards the nipple; when ``crossing`` is
    True an extra pair of vessels crossing each other is added (a classic false-positive
    trap). Returns the map and the crossing points (coarse pixel coordinates).

    Args:
        coarse_mask: coarse breast mask.
        sl: coarse pixel size in mm.
        rng: random generator.
        nipple_c: nipple ``(row, col)`` on the coarse grid.
        crossing: add an explicit vessel crossing.
    """
    h, w = coarse_mask.shape
    rows_in = np.flatnonzero(coarse_mask[:, : max(2, w // 10)].any(axis=1))
    out = np.zeros((h, w), dtype=np.float32)
    crossings: list[list[float]] = []
    if rows_in.size == 0:
        return out, crossings
    area_mm2 = float(coarse_mask.sum()) * sl * sl
    n_v = int(np.clip(rng.poisson(3 + area_mm2 / 6000.0), 2, 14))
    paths: list[tuple[np.ndarray, float, float]] = []
    step = 0.5
    span = float(coarse_mask.any(axis=1).sum())
    for _ in range(n_v):
        y = float(rng.choice(rows_in))
        x = float(np.flatnonzero(coarse_mask[int(y)])[0]) + rng.uniform(0, 0.1 * w)
        ty = nipple_c[0] + rng.normal(0, 0.25 * span)
        tx = nipple_c[1] * rng.uniform(0.7, 1.0)
        max_steps = int(rng.uniform(0.5, 1.1) * math.hypot(ty - y, tx - x) / step)
        heading = math.atan2(ty - y, tx - x) + rng.normal(0, 0.3)
        pts = []
        curv = 0.0
        for _s in range(max_steps):
            if not (0 <= y < h and 0 <= x < w) or not coarse_mask[int(y), int(x)]:
                break
            pts.append((y, x))
            target = math.atan2(ty - y, tx - x)
            curv = 0.98 * curv + rng.normal(0, 0.0004 * step * sl / 0.14)
            diff = math.atan2(math.sin(target - heading), math.cos(target - heading))
            heading += curv + 0.003 * diff
            y += step * math.sin(heading)
            x += step * math.cos(heading)
        if len(pts) > 10:
            paths.append((np.asarray(pts), rng.uniform(0.5, 1.4), rng.uniform(0.06, 0.16)))
    if crossing:
        inner = np.argwhere(ndi.distance_transform_edt(coarse_mask) * sl > 12.0)
        if inner.size:
            cy, cx = inner[int(rng.integers(len(inner)))].astype(float)
            a1 = rng.uniform(0, math.pi)
            a2 = a1 + rng.uniform(0.5, 1.4) * rng.choice([-1, 1])
            half_len = 12.0 / sl
            for ang in (a1, a2):
                ts = np.arange(-half_len, half_len, step)
                bend = rng.normal(0, 0.002) * ts**2
                pts = np.stack(
                    [cy + ts * math.sin(ang) + bend * math.cos(ang), cx + ts * math.cos(ang) - bend * math.sin(ang)], 1
                )
                keep = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
                paths.append((pts[keep], rng.uniform(0.6, 1.2), rng.uniform(0.12, 0.2)))
            crossings.append([cy, cx])
    for pts, width_mm, amp in paths:
        acc = np.zeros((h, w), dtype=np.float32)
        yi = np.clip(np.round(pts[:, 0]).astype(int), 0, h - 1)
        xi = np.clip(np.round(pts[:, 1]).astype(int), 0, w - 1)
        np.add.at(acc, (yi, xi), step)
        sig = max(width_mm / 2.5 / sl, 0.6)
        ys, ye = max(int(yi.min()) - int(4 * sig) - 2, 0), min(int(yi.max()) + int(4 * sig) + 3, h)
        xs, xe = max(int(xi.min()) - int(4 * sig) - 2, 0), min(int(xi.max()) + int(4 * sig) + 3, w)
        sub = ndi.gaussian_filter(acc[ys:ye, xs:xe], sig)
        out[ys:ye, xs:xe] += sub * (amp * math.sqrt(2 * math.pi) * sig)
    return out, crossings


def _masked_lowpass(img: np.ndarray, mask: np.ndarray, factor: int, sigma: float) -> np.ndarray:
    """Gaussian low-pass of ``img`` restricted to ``mask`` (normalised convolution).

    Computed on a grid ``factor`` times coarser and up-sampled; zero outside the mask.

    Args:
        img: full-resolution image.
        mask: boolean mask of valid pixels.
        factor: coarse grid factor.
        sigma: Gaussian sigma in coarse pixels.
    """
    height, width = img.shape
    h, w = -(-height // factor), -(-width // factor)
    pad = ((0, h * factor - height), (0, w * factor - width))
    m = np.pad(mask.astype(np.float32), pad)
    v = np.pad(img * mask, pad)
    m_c = m.reshape(h, factor, w, factor).mean(axis=(1, 3))
    v_c = v.reshape(h, factor, w, factor).mean(axis=(1, 3))
    num = ndi.gaussian_filter(v_c, sigma, mode="nearest")
    den = ndi.gaussian_filter(m_c, sigma, mode="nearest")
    low = np.where(m_c > 0, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)
    return _upsample(low, (height, width), factor)


def _density_fraction(density: float | str | None, rng: np.random.Generator) -> float:
    """Fraction of the breast area covered by fibroglandular tissue.

    Args:
        density: None (random BI-RADS-like category), a fraction in [0, 1] or a letter a-d.
        rng: random generator.
    """
    bounds = {"a": (0.03, 0.25), "b": (0.25, 0.5), "c": (0.5, 0.75), "d": (0.75, 0.92)}
    if density is None:
        cat = "abcd"[int(rng.choice(4, p=(0.1, 0.4, 0.4, 0.1)))]
        return float(rng.uniform(*bounds[cat]))
    if isinstance(density, str):
        key = density.strip().lower()
        if key not in bounds:
            raise ValueError(f"density must be a fraction or one of a, b, c, d; got {density!r}")
        return float(np.mean(bounds[key]))
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density fraction must lie in [0, 1], got {density}")
    return float(density)


def _draw_text(img: np.ndarray, text: str, top: int, left: int, cell: int, value: float) -> tuple[int, int, int, int]:
    """Burn ``text`` (5x7 glyphs, ``cell`` pixels per glyph dot) and a frame into ``img``.

    Returns the frame box ``(row0, col0, row1, col1)``.

    Args:
        img: image to draw into (modified in place).
        text: characters from the built-in glyph set.
        top: top row of the frame.
        left: left column of the frame.
        cell: size of one glyph dot in pixels.
        value: grey value of the strokes.
    """
    gw = 6 * cell
    box_h, box_w = 9 * cell, len(text) * gw + 2 * cell
    r1, c1 = min(top + box_h, img.shape[0]), min(left + box_w, img.shape[1])
    for i, ch in enumerate(text):
        glyph = _GLYPHS.get(ch, _GLYPHS["X"])
        bitmap = np.array([[c == "1" for c in row] for row in glyph], dtype=bool)
        big = np.kron(bitmap, np.ones((cell, cell), dtype=bool))
        y0, x0 = top + cell, left + cell + i * gw
        ye, xe = min(y0 + big.shape[0], img.shape[0]), min(x0 + big.shape[1], img.shape[1])
        if ye > y0 and xe > x0:
            region = img[y0:ye, x0:xe]
            region[big[: ye - y0, : xe - x0]] = value
    line = max(1, cell // 3)
    img[top : top + line, left:c1] = value
    img[max(r1 - line, top) : r1, left:c1] = value
    img[top:r1, left : left + line] = value
    img[top:r1, max(c1 - line, left) : c1] = value
    return top, left, r1, c1


def make_phantom(
    shape: Sequence[int] = (1024, 832),
    spacing: float = 0.07,
    view: str = "CC",
    laterality: str = "L",
    seed: int = 0,
    n_clusters: int | Sequence[int] = (1, 3),
    with_mcs: bool = True,
    traps: bool = True,
    density: float | str | None = None,
) -> dict[str, Any]:
    """Generate one synthetic FFDM image with exact MC labels.

    Orientation follows real mammograms: for ``laterality="L"`` the chest wall is at column 0
    and the breast extends to the right; ``"R"`` is the mirror image (chest wall on the right
    edge). The burned-in view label and skin marker are drawn after mirroring, so the text
    reads normally on both sides.

    Random streams are split per stage (geometry, tissue, MCs, noise, traps): the same seed
    gives the same anatomy whether ``with_mcs`` is True or False.

    Args:
        shape: ``(rows, cols)`` of the image.
        spacing: pixel size in mm.
        view: "CC" or "MLO".
        laterality: "L" or "R".
        seed: seed of all random choices.
        n_clusters: number of MC clusters, an int or inclusive ``(low, high)`` range.
        with_mcs: insert MC clusters.
        traps: add false-positive traps: an explicit vessel crossing, isolated noise spikes,
            a brighter skin line, a burned-in text label and a round skin marker.
        density: fibroglandular fraction in [0, 1], a BI-RADS-like letter "a"-"d", or None
            for a random one.

    Returns:
        dict with ``image`` (``uint16`` 0..16383, bright = dense), ``label`` (``uint8`` 0/1
        exact MC mask), ``breast`` (``uint8`` breast mask including the pectoral muscle) and
        ``info`` (clusters with their MCs, view, laterality, spacing, density, thickness,
        nipple, pectoral box, traps; coordinates in pixels of the returned image).
    """
    view = view.upper()
    laterality = laterality.upper()
    if view not in ("CC", "MLO"):
        raise ValueError(f"view must be 'CC' or 'MLO', got {view!r}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    height, width = (int(v) for v in shape)
    if height < 32 or width < 32:
        raise ValueError(f"shape must be at least 32 x 32, got {shape}")
    streams = np.random.SeedSequence([int(seed), 20240917]).spawn(6)
    rng_geo, rng_tis, rng_mc, rng_noise, rng_trap, rng_ves = (np.random.default_rng(s) for s in streams)

    # ---- geometry on a coarse grid ---------------------------------------------------
    f = max(1, int(round(_COARSE_MM / spacing)))
    sl = spacing * f
    h, w = -(-height // f), -(-width // f)
    rows_c = (np.arange(h) + 0.5) * f - 0.5
    cols_c = (np.arange(w) + 0.5) * f - 0.5
    xb = _outline(view, rows_c, height, width, rng_geo)
    mask_c = cols_c[None, :] < xb[:, None]
    if not mask_c.any():
        raise ValueError("breast outline is empty; use a larger shape")
    sdf_c = ndi.gaussian_filter(_signed_distance(mask_c, sl), 0.7)
    sdf = _upsample(sdf_c, (height, width), f)
    breast = sdf > 0
    i_n = int(np.argmax(xb))
    nipple = (float(rows_c[i_n]), float(xb[i_n]))
    depth_mm = float(xb.max()) * spacing
    thick = float(np.clip(rng_geo.uniform(0.25, 0.35) * depth_mm, 25.0, 70.0))
    skin = float(rng_geo.uniform(1.2, 2.0))
    rad = thick / 2.0

    # ---- tissue on the coarse grid (glandular fraction g) ------------------------------
    frac = _density_fraction(density, rng_tis)
    beta = float(rng_tis.normal(3.3, 0.24) if view == "MLO" else rng_tis.normal(3.17, 0.23))
    yy_c = rows_c[:, None] * spacing
    xx_c = cols_c[None, :] * spacing
    # ducts and ligaments converge towards a point a little behind the nipple
    conv_mm = (nipple[0] * spacing, max(nipple[1] * spacing - 0.2 * depth_mm, 0.0))
    r_conv = np.hypot(yy_c - conv_mm[0], xx_c - conv_mm[1])
    sub_fat = 4.0 + 0.04 * depth_mm
    prior = np.clip(sdf_c / sub_fat, 0, 1) ** 0.7
    prior = prior * np.clip(xx_c / (0.1 * depth_mm), 0, 1) ** 0.5
    band = 0.35 * float(mask_c.sum(0).max()) * sl
    prior = prior * np.exp(-0.25 * ((yy_c - nipple[0] * spacing) / band) ** 2)
    lowf = _spectral_noise((h, w), sl, rng_tis, beta=4.0, f_min=1.0 / 60.0)
    field = prior + 0.22 * lowf
    pect_c = np.zeros((h, w), dtype=bool)
    pect_info: dict[str, float] = {}
    if view == "MLO":
        border_c, x_p, y_p = _pectoral(rows_c, height, width, float(xb[0]), rng_geo)
        pect_c = cols_c[None, :] < border_c[:, None]
        pect_info = {"width_px": float(x_p), "height_px": float(y_p)}
    tissue = mask_c & ~pect_c
    vals = field[tissue] if tissue.any() else field[mask_c]
    thr = float(np.quantile(vals, 1.0 - frac)) if vals.size else 0.0
    dens = 1.0 / (1.0 + np.exp(-(field - thr) / 0.12))
    dens *= np.clip(sdf_c / 3.0, 0, 1)
    tex = _spectral_noise((h, w), sl, rng_tis, beta=beta, f_min=0.02)
    fine = _spectral_noise((h, w), sl, rng_tis, beta=2.2, f_min=0.1)
    # MLO: strands run from the axilla (upper chest wall) towards the nipple
    ang_n = math.atan2(nipple[0] - 0.25 * height, nipple[1]) if view == "MLO" else 0.0
    # the foam layers live on a grid twice as coarse; distances to edges are extrapolated
    # exactly (locally linear), so this costs no sharpness
    fshape = (-(-h // 2), -(-w // 2))
    foam_small = _foam(fshape, 2 * sl, rng_tis, float(rng_tis.uniform(5.0, 9.0)), ang_n, 1.6)
    cells = np.repeat(np.repeat(foam_small[3], 2, axis=0), 2, axis=1)[:h, :w]
    lobule = rng_tis.uniform(0.0, 0.04, size=int(cells.max()) + 1)[cells]
    # fat lobules: darker centres, brighter rims along the septa
    rim = np.exp(-np.abs(_linear_upsample(*foam_small[:3], (h, w), 2)) / 1.2)
    g_fat = np.clip(0.03 + 0.03 * tex + 0.02 * fine + lobule + 0.04 * rim, 0, 0.3)
    g_dense = np.clip(0.24 + 0.06 * tex + 0.03 * fine, 0.05, 1.0)
    g = dens * g_dense + (1 - dens) * g_fat
    # clustered lumpy component (Bochud et al. 1999 style) inside the dense region
    cand = np.argwhere(dens > 0.5)
    if cand.size:
        lumps = np.zeros((h, w), dtype=np.float32)
        n_cl = int(cand.shape[0] * sl * sl / 60.0) + 1
        centres = cand[rng_tis.integers(len(cand), size=n_cl)]
        for cy, cx in centres:
            n_l = int(rng_tis.poisson(8))
            pts = np.round(np.array([cy, cx]) + rng_tis.normal(0, 2.5 / sl, size=(n_l, 2))).astype(int)
            ok = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
            np.add.at(lumps, (pts[ok, 0], pts[ok, 1]), 1.0)
        sig_l = 0.8 / sl
        lumps = ndi.gaussian_filter(lumps, sig_l) * (2 * math.pi * sig_l**2)
        g += 0.03 * np.tanh(lumps) * dens
    ves, crossings_c = _vessels(mask_c, sl, rng_ves, (float(nipple[0] / f), float(nipple[1] / f)), traps)
    g += ves
    # curvilinear network: layers of thin bright curves (ligaments around fat lobules,
    # fibrous strands converging to the nipple), faded in and out by smooth visibility maps
    inside = np.clip(sdf_c / 1.5, 0, 1) * (~pect_c) * np.clip(r_conv / 10.0, 0, 1)
    foam_large = _foam(fshape, 2 * sl, rng_tis, float(rng_tis.uniform(10.0, 18.0)), ang_n, 2.0)
    strands = _foam(fshape, 2 * sl, rng_tis, 6.0, ang_n, 2.0)
    specs = [
        (foam_small, 0.3, 0.07, 1 - 0.6 * dens),
        (foam_large, 0.5, 0.25, 1 - 0.4 * dens),
        (strands, 0.3, 0.15, 0.7 + 0.3 * dens),
    ]
    layers = []
    for (dist_mm, g_row, g_col, _), width_mm, amp, weight in specs:
        vis = _spectral_noise((h, w), sl, rng_tis, sigma_mm=6.0)
        vis = np.clip(0.9 * vis + rng_tis.uniform(-0.1, 0.3), 0, 1)
        scale = 1.0 / (width_mm * float(rng_tis.uniform(0.8, 1.25)))
        layers.append((dist_mm * scale, g_row * scale, g_col * scale, amp * vis * weight * inside))

    # ---- attenuation map at full resolution --------------------------------------------
    dm = np.clip(sdf, 0, rad)
    t_all = 2.0 * np.sqrt(dm * (2 * rad - dm))
    dm2 = np.clip(sdf - skin, 0, rad - skin)
    t_in = 2.0 * np.sqrt(dm2 * (2 * (rad - skin) - dm2))
    del dm, dm2
    g_full = _upsample(g, (height, width), f)
    for dist, g_row, g_col, a_map in layers:
        dd = _linear_upsample(dist, g_row, g_col, (height, width), 2 * f)
        dd *= dd
        dd *= -0.5
        np.exp(dd, out=dd)
        dd *= _upsample(a_map, (height, width), f)
        g_full += dd
        del dd
    np.clip(g_full, 0.0, 1.6, out=g_full)
    mu_skin = _MU_SKIN * (1.3 if traps else 1.0)
    att = t_in * (_MU_ADIPOSE + (_MU_GLAND - _MU_ADIPOSE) * g_full)
    att += mu_skin * (t_all - t_in)
    del g_full
    pect = np.zeros((height, width), dtype=bool)
    if view == "MLO":
        rows_f = np.arange(height, dtype=np.float64)
        border_f = np.interp(rows_f, rows_c, border_c)
        n_rows = int(min(height, math.ceil(pect_info["height_px"]) + 2))
        cols_f = np.arange(width, dtype=np.float32)[None, :]
        edge_px = 0.6 / spacing
        soft = np.clip((border_f[:n_rows, None] - cols_f) / edge_px + 0.5, 0, 1)
        close = 1.0 - np.clip(cols_f / np.maximum(border_f[:n_rows, None], 1.0), 0, 1)
        ang = math.atan2(pect_info["height_px"], -pect_info["width_px"])
        stri = _spectral_noise((h, w), sl, rng_tis, sigma_mm=0.8, anisotropy=(4.0, ang))
        stri_f = _upsample(stri[: -(-n_rows // f) + 1], (n_rows, width), f)
        frac_m = soft * np.clip(0.35 + 0.4 * np.sqrt(close) + 0.015 * stri_f, 0, 1)
        # replace the fraction frac_m of the tissue path by muscle
        tissue_att = att[:n_rows] - mu_skin * (t_all[:n_rows] - t_in[:n_rows])
        att[:n_rows] += frac_m * (t_in[:n_rows] * _MU_MUSCLE - tissue_att)
        del tissue_att
        pect[:n_rows] = soft >= 0.5
        del soft, close, frac_m, stri_f
        # MCs keep 2 mm away from the muscle border (a horizontal shift of the border)
        n_avoid = int(min(height, n_rows + math.ceil(2.0 / spacing)))
        shifted = np.interp(rows_f[:n_avoid] - 2.0 / spacing, rows_f, border_f) + 2.0 / spacing
        pect_avoid = np.zeros((height, width), dtype=bool)
        pect_avoid[:n_avoid] = cols_f < shifted[:, None]
    pect &= breast

    # ---- MCs (attenuation domain, gain 1) ------------------------------------------------
    clusters: list[dict[str, Any]] = []
    label = np.zeros((height, width), dtype=np.uint8)
    if with_mcs:
        avoid = pect_avoid if view == "MLO" else None
        att, label, clusters = inject_mcs(
            att, breast, spacing, rng_mc, n_clusters=n_clusters, avoid=avoid, gain=1.0, margin_mm=3.0
        )

    # ---- detector: counts, Poisson + electronic noise, log ------------------------------
    n_fat = float(rng_noise.uniform(2000, 6000)) * (spacing / 0.07) ** 2
    att_ref = _MU_ADIPOSE * (thick - 2 * skin) + mu_skin * 2 * skin
    n0 = n_fat * math.exp(att_ref)
    counts = n0 * np.exp(-att)
    noisy = rng_noise.poisson(counts).astype(np.float32)
    del counts
    sigma_e = float(rng_noise.uniform(2.0, 6.0))
    noisy += sigma_e * rng_noise.standard_normal((height, width), dtype=np.float32)
    np.maximum(noisy, 1.0, out=noisy)
    log_sig = np.log(np.float32(n0)) - np.log(noisy)
    del noisy
    # for-presentation processing, affine in the log signal inside the breast: thickness
    # equalisation, compression of the large-scale (low-pass) component, then a window
    # that maps the breast to [p_lo, p_hi]; the background is black
    alpha = float(rng_noise.uniform(0.85, 1.0))
    keep_low = float(rng_noise.uniform(0.3, 0.5))
    log_sig -= alpha * _MU_ADIPOSE * t_all
    low = _masked_lowpass(log_sig, breast, f, float(rng_noise.uniform(6.0, 12.0)) / sl)
    log_sig -= (1.0 - keep_low) * low
    del low
    sample = log_sig[::3, ::3][breast[::3, ::3]]
    q_lo, q_hi = (float(v) for v in np.percentile(sample, [2.0, 99.5])) if sample.size else (0.0, 1.0)
    p_lo, p_hi = float(rng_noise.uniform(500, 1200)), float(rng_noise.uniform(9000, 12000))
    gain = (p_hi - p_lo) / max(q_hi - q_lo, 1e-3)
    log_sig -= q_lo
    log_sig *= gain
    log_sig += p_lo
    log_sig *= np.clip(t_all / 0.5, 0, 1)
    image = log_sig
    label_b = label
    breast_b = breast
    if laterality == "R":
        image = image[:, ::-1]
        label_b = label[:, ::-1]
        breast_b = breast[:, ::-1]
        pect = pect[:, ::-1]

    def _col(c: float) -> float:
        return float(width - 1 - c) if laterality == "R" else float(c)

    for cl in clusters:
        cl["centre"] = [cl["centre"][0], _col(cl["centre"][1])]
        for mc in cl["mcs"]:
            mc["centre"] = [mc["centre"][0], _col(mc["centre"][1])]
    nipple_out = [nipple[0], _col(nipple[1])]

    # ---- traps in the final orientation ---------------------------------------------------
    crossings = [[(cy + 0.5) * f - 0.5, _col((cx + 0.5) * f - 0.5)] for cy, cx in crossings_c]
    trap_info: dict[str, Any] = {"vessel_crossings": crossings}
    image = np.ascontiguousarray(image)
    if traps:
        # isolated noise spikes (single bright pixels, not blurred by the PSF)
        n_spk = int(rng_trap.integers(6, 16))
        inside = np.argwhere(breast_b[:: max(1, f), :: max(1, f)]) * max(1, f)
        spikes = []
        for i in range(n_spk):
            if i < 0.7 * n_spk and inside.size:
                r, c = inside[int(rng_trap.integers(len(inside)))]
            else:
                r, c = int(rng_trap.integers(height)), int(rng_trap.integers(width))
            if label_b[r, c]:
                continue
            image[r, c] += gain * float(rng_trap.uniform(0.15, 0.5))
            spikes.append([int(r), int(c)])
        trap_info["noise_spikes"] = spikes
        # round skin marker (metal bead) just outside the skin near the nipple
        bead_r = float(rng_trap.uniform(1.0, 1.6)) / spacing
        gap = float(rng_trap.uniform(1.0, 3.0)) / spacing
        direction = 1.0 if laterality == "L" else -1.0
        mr = nipple_out[0] + float(rng_trap.uniform(-3, 3)) / spacing
        mc_ = nipple_out[1] + direction * (bead_r + gap)
        r0, r1 = int(max(mr - bead_r - 2, 0)), int(min(mr + bead_r + 3, height))
        c0, c1 = int(max(mc_ - bead_r - 2, 0)), int(min(mc_ + bead_r + 3, width))
        if r1 > r0 and c1 > c0:
            yy, xx = np.mgrid[r0:r1, c0:c1]
            prof = np.sqrt(np.clip(1.0 - ((yy - mr) ** 2 + (xx - mc_) ** 2) / bead_r**2, 0, None))
            bead_val = float(rng_trap.uniform(13500, 16383))
            image[r0:r1, c0:c1] = np.maximum(image[r0:r1, c0:c1], bead_val * prof**0.25)
            trap_info["skin_marker"] = [float(mr), float(mc_), float(bead_r)]
        # burned-in text label in a background corner away from the chest wall (smaller
        # glyphs when the background is small)
        text = f"{laterality}{view}"
        margin = max(2, int(0.03 * width))
        guard = ndi.binary_dilation(breast_b[::f, ::f], iterations=max(1, int(2.0 / sl)))
        text_val = float(rng_trap.uniform(12000, 16383))
        base = max(1, int(round(0.45 / spacing)))
        placed = False
        for cell in sorted({base, max(1, base // 2), max(1, base // 3)}, reverse=True):
            box_h, box_w = 9 * cell, len(text) * 6 * cell + 2 * cell
            for top in (margin, height - margin - box_h):
                left = width - margin - box_w if laterality == "L" else margin
                if top < 0 or left < 0:
                    continue
                region = guard[top // f : (top + box_h) // f + 1, left // f : (left + box_w) // f + 1]
                if not region.any():
                    trap_info["text_box"] = list(_draw_text(image, text, top, left, cell, text_val))
                    placed = True
                    break
            if placed:
                break

    np.clip(image, 0, MAX_VALUE_14BIT, out=image)
    image_u16 = np.rint(image).astype(np.uint16)
    info: dict[str, Any] = {
        "view": view,
        "laterality": laterality,
        "spacing": float(spacing),
        "shape": [height, width],
        "seed": int(seed),
        "density": frac,
        "beta": beta,
        "thickness_mm": thick,
        "skin_mm": skin,
        "nipple": nipple_out,
        "gain_per_log_unit": float(gain),
        "psf": "gaussian",
        "clusters": clusters,
        "traps": trap_info,
    }
    if pect_info:
        info["pectoral"] = pect_info
    return {
        "image": image_u16,
        "label": np.ascontiguousarray(label_b, dtype=np.uint8),
        "breast": np.ascontiguousarray(breast_b, dtype=np.uint8),
        "info": info,
    }


# ----------------------------------------------------------------------------------------
# DICOM and data set writers
# ----------------------------------------------------------------------------------------


def write_mg_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    spacing: float | None,
    laterality: str,
    view: str,
    seed: int = 0,
    photometric: str = "MONOCHROME2",
    rle: bool = False,
    patient_id: str = "PHANTOM",
    bits_stored: int = 14,
    use_imager_spacing: bool = False,
    *,
    burned_in_annotation: bool = False,
    derived: bool = False,
    description: str = "mcref synthetic mammogram",
) -> None:
    """Write a Digital Mammography X-Ray Image - For Presentation DICOM file (MG).

    ``pixels`` are bright = dense values. With ``photometric="MONOCHROME1"`` the stored
    values are inverted (``2**bits_stored - 1 - v``), so a reader that inverts MONOCHROME1
    with the same maximum recovers ``pixels``. UIDs derive deterministically from
    ``(patient_id, seed, laterality, view)`` (``pydicom.uid.generate_uid`` with entropy
    sources), so the same inputs give the same file. The file is written to a temporary
    name in the target folder and renamed.

    Args:
        path: destination file.
        pixels: 2-D integer array, values in ``[0, 2**bits_stored - 1]``.
        spacing: pixel size in mm, or None to write no spacing attribute.
        laterality: "L" or "R" (ImageLaterality).
        view: view position, e.g. "CC" or "MLO" (ViewPosition and View Code Sequence).
        seed: entropy for the UIDs.
        photometric: "MONOCHROME2" (bright = dense) or "MONOCHROME1" (stored inverted).
        rle: compress with RLE Lossless.
        patient_id: PatientID (also PatientName, as the family name).
        bits_stored: BitsStored (HighBit = BitsStored - 1, BitsAllocated = 16).
        use_imager_spacing: write ImagerPixelSpacing instead of PixelSpacing.
        burned_in_annotation: value of BurnedInAnnotation ("YES"/"NO").
        derived: ImageType DERIVED/SECONDARY instead of ORIGINAL/PRIMARY (for injected
            real images).
        description: SeriesDescription.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RLELossless, generate_uid

    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"pixels must be an integer array, got {arr.dtype}")
    if not 8 <= int(bits_stored) <= 16:
        raise ValueError(f"bits_stored must lie in [8, 16], got {bits_stored}")
    max_v = (1 << int(bits_stored)) - 1
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > max_v):
        raise ValueError(f"pixel values must lie in [0, {max_v}] for bits_stored={bits_stored}")
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    laterality = laterality.upper()
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    view = view.upper()
    arr = arr.astype(np.uint16)
    stored = (max_v - arr).astype(np.uint16) if photometric == "MONOCHROME1" else arr

    ent = ["mcref", str(patient_id), str(int(seed))]
    study_uid = generate_uid(entropy_srcs=ent + ["study"])
    series_uid = generate_uid(entropy_srcs=ent + ["series", laterality, view])
    sop_uid = generate_uid(entropy_srcs=ent + ["instance", laterality, view])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.ImageType = ["DERIVED", "SECONDARY"] if derived else ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"MCREF{int(seed) % 10**10:010d}"
    ds.Modality = "MG"
    ds.Manufacturer = "mcref"
    ds.ManufacturerModelName = "synthetic"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = description
    ds.PatientName = f"{patient_id}^"  # family name only; the caret says so (pydicom warns otherwise)
    ds.PatientID = str(patient_id)
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DetectorType = "DIRECT"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    ds.ViewPosition = view
    if view in _SCT_VIEW:
        code = Dataset()
        code.CodeValue, code.CodeMeaning = _SCT_VIEW[view]
        code.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = DicomSequence([code])
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence([])
    row_dir = "A" if laterality == "L" else "P"
    col_dir = "F" if view == "MLO" else ("R" if laterality == "L" else "L")
    ds.PatientOrientation = [row_dir, col_dir]
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.OrganExposed = "BREAST"
    ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    if spacing is not None:
        sp = [f"{float(spacing):.6g}", f"{float(spacing):.6g}"]
        if use_imager_spacing:
            ds.ImagerPixelSpacing = sp
        else:
            ds.PixelSpacing = sp
    fg = arr[arr > max_v * 0.05]
    if fg.size == 0:
        fg = arr.ravel()
    sample = fg[:: max(1, fg.size // 500_000)]
    lo, hi = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    centre, width = 0.5 * (lo + hi), max(hi - lo, 1.0)
    if photometric == "MONOCHROME1":
        centre = max_v - centre
    ds.WindowCenter = f"{centre:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.astype("<u2").tobytes()
    if rle:
        ds.compress(RLELossless, generate_instance_uid=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, "".join(path.suffixes)) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_label_nifti(path: str | os.PathLike, label: np.ndarray, spacing: float) -> None:
    """Write a 2-D ``uint8`` label ``(rows, cols)`` as NIfTI, atomically.

    Args:
        path: destination ``.nii.gz`` file.
        label: 2-D label aligned with ``pixel_array[r, c]``.
        spacing: pixel size in mm (affine ``diag(spacing, spacing, 1, 1)``).
    """
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(np.ascontiguousarray(label, dtype=np.uint8), np.diag([spacing, spacing, 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    with atomic_path(path, "".join(path.suffixes)) as tmp:  # nibabel picks the format from the suffix
        nib.save(img, tmp)


def _split_counts(n_cases: int, splits: Sequence[float] | Sequence[int]) -> tuple[int, int, int]:
    """Number of training, validation and test cases.

    Args:
        n_cases: total number of cases.
        splits: three fractions (summing to 1) or three integer counts (summing to n_cases).
    """
    if len(splits) != 3:
        raise ValueError(f"splits must have three entries (training, validation, test), got {splits}")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in splits):
        counts = tuple(int(v) for v in splits)
        if sum(counts) != n_cases or min(counts) < 0:
            raise ValueError(f"split counts {counts} must be >= 0 and sum to n_cases={n_cases}")
        return counts  # type: ignore[return-value]
    fr = [float(v) for v in splits]
    if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {splits} must be >= 0 and sum to 1")
    n_val = int(round(fr[1] * n_cases))
    n_test = int(round(fr[2] * n_cases))
    n_val = min(n_val, n_cases)
    n_test = min(n_test, n_cases - n_val)
    return n_cases - n_val - n_test, n_val, n_test


def _json_ready(obj: Any) -> Any:
    """Convert numpy scalars and tuples inside ``obj`` to plain JSON types.

    Args:
        obj: nested dicts/lists of values.
    """
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically.

    Args:
        path: destination.
        obj: JSON-serialisable object.
    """
    with atomic_path(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_json_ready(obj), fh, indent=1)


def make_dataset(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    shape: Sequence[int] = (1024, 832),
    spacing: float = 0.07,
    splits: Sequence[float] | Sequence[int] = (0.7, 0.15, 0.15),
    with_mcs: bool = True,
    progress: bool = True,
    *,
    negative_fraction: float = 0.0,
    traps: bool = True,
) -> Path:
    """Write a synthetic MG data set: DICOM images, NIfTI labels and a MONAI datalist.

    Files in ``out_dir``: ``case_XXX.dcm`` (a mix of L/R, CC/MLO, some MONOCHROME1, some
    RLE-compressed, PixelSpacing or ImagerPixelSpacing), ``case_XXX_label.nii.gz``
    (``uint8``, array ``(rows, cols)`` aligned with ``pixel_array[r, c]``, affine
    ``diag(spacing, spacing, 1, 1)``), ``datalist.json`` (decathlon style: ``training``,
    ``validation``, ``test`` lists of ``{"image", "label"}`` paths relative to ``out_dir``)
    and ``cases.json`` (per-case parameters and MC cluster descriptions). Everything is
    determined by ``seed``: the same seed gives identical pixel data.

    Args:
        out_dir: output folder (created).
        n_cases: number of cases.
        seed: master seed; case ``i`` uses a seed derived from ``(seed, i)``.
        shape: ``(rows, cols)`` of every image.
        spacing: pixel size in mm.
        splits: fractions (summing to 1) or integer counts for training/validation/test;
            cases are assigned in order.
        with_mcs: insert MC clusters.
        progress: show a tqdm progress bar.
        negative_fraction: fraction of cases without MCs (when ``with_mcs``), chosen at
            random per case.
        traps: add the false-positive traps of :func:`make_phantom`.

    Returns:
        path of ``datalist.json``.
    """
    from tqdm import tqdm

    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_val, _ = _split_counts(n_cases, splits)
    children = np.random.SeedSequence([int(seed), 7]).spawn(n_cases)
    datalist: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    cases: list[dict[str, Any]] = []
    width = max(3, len(str(n_cases - 1)))
    for i in tqdm(range(n_cases), desc="phantoms", disable=not progress):
        rng = np.random.default_rng(children[i])
        case_seed = int(children[i].generate_state(1)[0])
        lat = "L" if rng.random() < 0.5 else "R"
        view = "CC" if rng.random() < 0.5 else "MLO"
        photometric = "MONOCHROME1" if rng.random() < 0.25 else "MONOCHROME2"
        rle = bool(rng.random() < 0.2)
        imager = bool(rng.random() < 0.5)
        mcs = bool(with_mcs and rng.random() >= negative_fraction)
        ph = make_phantom(
            shape=shape, spacing=spacing, view=view, laterality=lat, seed=case_seed, with_mcs=mcs, traps=traps
        )
        name = f"case_{i:0{width}d}"
        pid = f"MCREF{int(seed) % 100000:05d}{i:0{width}d}"
        write_mg_dicom(
            out / f"{name}.dcm",
            ph["image"],
            spacing,
            lat,
            view,
            seed=case_seed,
            photometric=photometric,
            rle=rle,
            patient_id=pid,
            bits_stored=14,
            use_imager_spacing=imager,
            burned_in_annotation=traps,
        )
        write_label_nifti(out / f"{name}_label.nii.gz", ph["label"], spacing)
        split = "training" if i < n_train else ("validation" if i < n_train + n_val else "test")
        datalist[split].append({"image": f"{name}.dcm", "label": f"{name}_label.nii.gz"})
        info = ph["info"]
        cases.append(
            {
                "case": name,
                "split": split,
                "seed": case_seed,
                "laterality": lat,
                "view": view,
                "photometric": photometric,
                "rle": rle,
                "imager_pixel_spacing": imager,
                "with_mcs": mcs,
                "n_clusters": len(info["clusters"]),
                "n_mcs": sum(len(c["mcs"]) for c in info["clusters"]),
                "label_pixels": int(ph["label"].sum()),
                "info": info,
            }
        )
    _write_json(out / "cases.json", cases)
    path = out / "datalist.json"
    _write_json(path, datalist)
    return path
