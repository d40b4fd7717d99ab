"""Building blocks of the phantom anatomy, on a coarse grid (chest wall at column 0).

Random fields (power-law anatomical noise and smooth fields, :func:`_spectral_noise`), grid
helpers (bilinear and locally linear up-sampling, signed distances), the breast outline of a CC
or MLO view, the pectoral muscle border, a warped Voronoi foam for Cooper's ligaments and fat
lobules, vessels, and the fibroglandular fraction. :func:`bundle.phantomimage.make_phantom`
assembles them into an image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__: list[str] = []


# ----------------------------------------------------------------------------------------
# grids and random fields
# ----------------------------------------------------------------------------------------
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
