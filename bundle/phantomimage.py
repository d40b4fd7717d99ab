"""One synthetic full-field digital mammogram (FFDM) with exact MC labels: :func:`make_phantom`.

The anatomy of :mod:`bundle.anatomy` becomes an attenuation map (compressed breast with a
semicircular periphery and a skin layer, pectoral muscle in MLO views), MCs are added by
:func:`bundle.mcmodel.inject_mcs`, then detector counts with Poisson and electronic noise, and a
"for presentation" mapping of the log signal to a 14-bit image in which bright means dense;
false-positive traps (noise spikes, skin marker, burned-in text) are drawn last. The model and
its references are in ``docs/phantom.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from bundle.anatomy import (
    _density_fraction,
    _foam,
    _linear_upsample,
    _outline,
    _pectoral,
    _signed_distance,
    _spectral_noise,
    _upsample,
    _vessels,
)
from bundle.mcmodel import inject_mcs

__all__ = ["MAX_VALUE_14BIT", "make_phantom"]


MAX_VALUE_14BIT = 16383
# linear attenuation coefficients in 1/mm near 20 keV (adipose, glandular, skin, muscle)
_MU_ADIPOSE = 0.0456
_MU_GLAND = 0.0802
_MU_SKIN = 0.0802
_MU_MUSCLE = 0.08
# spacing (mm) of the coarse grid on which smooth fields are synthesised
_COARSE_MM = 0.28
# 5x7 bitmap glyphs for burned-in view labels
_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
}


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
