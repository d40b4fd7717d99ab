"""The image-formation model of microcalcifications (MCs) and their injection into images.

:func:`mc_profile` renders one MC's pixel-averaged projected thickness (round, irregular, rod,
branching: :data:`MC_SHAPES`); :func:`inject_mcs` places clusters of them inside a breast mask and
adds them to a bright = dense image: each profile ``p`` is blurred by a Gaussian detector PSF and
multiplies the detector signal by ``1 - c * blur(p)``, i.e. adds ``-gain * log(1 - c * blur(p))``
in the log domain. The exact label is ``p >= 0.5`` plus the peak pixel of each MC. Used by the
phantoms (:mod:`bundle.phantomimage`) and on real images (``bundle.mcgenref``). All randomness
comes from the caller's ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["MC_SHAPES", "mc_profile", "inject_mcs"]


MC_SHAPES = ("round", "irregular", "rod", "branching")
# effective attenuation of MC material (calcium hydroxyapatite) in 1/mm near 20 keV
_MU_MC = 1.2
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
