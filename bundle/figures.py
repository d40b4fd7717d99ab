"""Figures of the evaluation: the study's per-case panels, Fig. 6 curves and cluster FROC, and the
pictures the tracking handlers log (sample panels, detection-rate curves).

Drawn on matplotlib ``Figure`` objects (Agg canvas), never through ``pyplot``, so that nothing
depends on (or changes) a global figure state; the study's PNG files are written atomically.
:mod:`bundle.study` and :mod:`bundle.tracking` re-export the public ones.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from bundle.objects import _mask, _np2d
from bundle.reports import atomic_path, overlay_rgb
from bundle.study_settings import method_label

__all__ = ["case_panel", "crop_gallery", "plot_curves", "plot_froc", "sample_figure"]


# ----------------------------------------------------------------------------------------------
# the study's pictures
# ----------------------------------------------------------------------------------------------
def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _reduce(arr: np.ndarray, factor: int, how: str) -> np.ndarray:
    if factor <= 1:
        return arr
    from skimage.measure import block_reduce

    return block_reduce(arr, (factor, factor), np.max if how == "max" else np.mean)


def case_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    prob: np.ndarray,
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    objects: Sequence[Mapping[str, Any]],
    detected: Sequence[bool],
    virtual_normal: np.ndarray | None = None,
    breast: np.ndarray | None = None,
    title: str = "",
    max_side: int = 512,
    zoom_px: int = 192,
    zoom_center: tuple[float, float] | None = None,
    max_markers: int = 400,
) -> None:
    """Figure A2-style panel: (a) original, (b) virtual normal, (c) difference / probability map,
    (d) overlay (predicted mask red, truth contour green); detected truth objects circled green,
    missed ones yellow. Top row: whole image (downsampled to ``max_side``); bottom row: a
    full-resolution ``zoom_px`` crop around ``zoom_center``. The original and the virtual normal
    share one grey scale. Written atomically with matplotlib's Agg canvas (no pyplot state).

    Args:
        path: PNG file.
        image: (H, W) normalised image.
        prob: (H, W) probability map of the method.
        pred_mask: (H, W) predicted mask at the operating threshold.
        truth_mask: (H, W) truth mask.
        objects: truth objects (``centroid_row``, ``centroid_col``, ``diameter_mm`` unused).
        detected: per object, detected at the operating threshold.
        virtual_normal: (H, W) virtual normal image, or None for non-generative methods.
        breast: optional breast mask (grey-level percentiles).
        title: figure title.
        max_side: longest side of the whole-image panels.
        zoom_px: side of the zoom crop.
        zoom_center: (row, col) of the zoom; default: the truth object with most neighbours, else
            the highest probability.
        max_markers: at most this many object circles.
    """
    img = _np2d(image, "image", np.float32)
    h, w = img.shape
    pr = np.nan_to_num(_np2d(prob, "prob", np.float32))
    pm = _mask(pred_mask, "pred_mask")
    tm = _mask(truth_mask, "truth_mask")
    bm = None if breast is None else _mask(breast, "breast")
    region = bm if bm is not None and bm.any() else np.isfinite(img)
    lo, hi = (float(v) for v in np.percentile(img[region], [1.0, 99.0]))
    if not hi > lo:
        hi = lo + 1.0
    vn = None if virtual_normal is None else _np2d(virtual_normal, "virtual_normal", np.float32)
    factor = max(1, int(math.ceil(max(h, w) / float(max_side))))
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)

    rows_c = np.array([o["centroid_row"] for o in objects], dtype=float)
    cols_c = np.array([o["centroid_col"] for o in objects], dtype=float)
    det = np.asarray(detected, dtype=bool).reshape(-1)
    if zoom_center is None:
        if len(objects):
            pts = np.stack([rows_c, cols_c], axis=1)
            nb = np.array([len(x) for x in cKDTree(pts).query_ball_point(pts, r=zoom_px / 2.0)])
            k = int(np.argmax(nb))
            zoom_center = (float(rows_c[k]), float(cols_c[k]))
        else:
            r, c = np.unravel_index(int(np.argmax(pr)), pr.shape)
            zoom_center = (float(r), float(c))
    zs = min(zoom_px, h, w)
    r0 = int(np.clip(round(zoom_center[0] - zs / 2), 0, h - zs))
    c0 = int(np.clip(round(zoom_center[1] - zs / 2), 0, w - zs))
    zsl = (slice(r0, r0 + zs), slice(c0, c0 + zs))

    fig = _figure((16, 8.6))
    axes = fig.subplots(2, 4)
    titles = [
        "(a) original",
        "(b) virtual normal" if vn is not None else "(b) virtual normal: n/a (not generative)",
        "(c) difference map (refined)" if vn is not None else "(c) probability map",
        "(d) overlay: pred red, truth green",
    ]
    views = [((slice(0, h), slice(0, w)), factor, extent), (zsl, 1, (c0 - 0.5, c0 + zs - 0.5, r0 + zs - 0.5, r0 - 0.5))]
    for row, (sl, fac, ext) in enumerate(views):
        ax = axes[row]
        crop = img[sl]
        ax[0].imshow(_reduce(crop, fac, "mean"), cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        if vn is not None:
            ax[1].imshow(_reduce(vn[sl], fac, "mean"), cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        else:
            ax[1].imshow(np.zeros((2, 2)), cmap="gray", vmin=0, vmax=1, extent=ext)
        ax[2].imshow(_reduce(pr[sl], fac, "max"), cmap="magma", vmin=0, vmax=1, extent=ext, interpolation="nearest")
        side = max(crop.shape) if fac > 1 else max(crop.shape) * 4
        rgb = overlay_rgb(crop, pm[sl], tm[sl], max_side=min(max_side, side) if fac > 1 else side, breast=None)
        if fac == 1 and rgb.shape[:2] != crop.shape:
            rgb = rgb[: crop.shape[0], : crop.shape[1]]
        ax[3].imshow(rgb, extent=ext, interpolation="nearest")
        if len(objects):
            inside = (rows_c >= sl[0].start) & (rows_c < sl[0].stop) & (cols_c >= sl[1].start) & (cols_c < sl[1].stop)
            idx = np.flatnonzero(inside)[:max_markers]
            for a in (ax[0], ax[3]):
                for flag, colour in ((True, "lime"), (False, "yellow")):
                    s = idx[det[idx] == flag]
                    if s.size:
                        a.scatter(cols_c[s], rows_c[s], s=60 if row else 30, facecolors="none", edgecolors=colour, linewidths=0.8)
        for j, a in enumerate(ax):
            a.set_xlim(ext[0], ext[1])
            a.set_ylim(ext[2], ext[3])
            a.set_xticks([])
            a.set_yticks([])
            if row == 0:
                a.set_title(titles[j], fontsize=10)
        ax[0].set_ylabel("whole image" if row == 0 else f"zoom {zs}x{zs} px", fontsize=9)
    n_det = int(det.sum()) if det.size else 0
    fig.suptitle(f"{title}   truth objects: {len(objects)} (detected {n_det}, circled green; missed yellow)", fontsize=11)
    fig.tight_layout()
    _save_figure(fig, path, dpi=80)


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    xscale: str = "log",
    xticklabels: Sequence[str] | None = None,
) -> None:
    """Line plot of one curve per method (with optional confidence bands), as a PNG.

    Args:
        curves: method -> (x, y).
        path: PNG file.
        title: plot title.
        xlabel: x axis label.
        ylabel: y axis label.
        bands: method -> (low, high) arrays drawn as shaded bands.
        xscale: "log" or "linear".
        xticklabels: labels of the x values of the first curve.
    """
    fig = _figure((7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for name, (x, y) in curves.items():
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        ax.plot(x, y, marker="o", ms=3, label=method_label(name))
        if bands and name in bands:
            lo, hi = (np.asarray(v, dtype=float) for v in bands[name])
            ax.fill_between(x, lo, hi, alpha=0.12)
    if xscale == "log":
        ax.set_xscale("log")
    if xticklabels is not None and curves:
        x0 = np.asarray(next(iter(curves.values()))[0], dtype=float)
        ax.set_xticks(x0)
        ax.set_xticklabels(list(xticklabels), fontsize=7, rotation=45)
        ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_froc(
    frocs: Mapping[str, tuple[np.ndarray, np.ndarray, int]],
    path: str | os.PathLike,
    fp_rates: Sequence[float],
    title: str = "Cluster FROC",
) -> None:
    """FROC curves (FP clusters per image on a log axis), operating points marked.

    Args:
        frocs: method -> (fp_per_image (T,), sensitivity (T,), index of the operating point).
        path: PNG file.
        fp_rates: FP rates of the summary, drawn as vertical guides.
        title: plot title.
    """
    fig = _figure((7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    floor = min(fp_rates) / 4.0 if fp_rates else 0.01
    for name, (fpi, sens, op) in frocs.items():
        x = np.maximum(np.asarray(fpi, dtype=float), floor)
        order = np.argsort(x, kind="stable")
        line = ax.plot(x[order], np.asarray(sens)[order], marker=".", label=method_label(name))
        if 0 <= op < len(x):
            ax.plot([x[op]], [sens[op]], marker="*", ms=10, color=line[0].get_color())
    for f in fp_rates:
        ax.axvline(f, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"false-positive clusters per image (values below {floor:g} drawn at {floor:g})")
    ax.set_ylabel("cluster sensitivity")
    ax.set_title(title + " (star: operating threshold)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if frocs:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save_figure(fig, path)


def _png_data_uri(path: str | os.PathLike) -> str:
    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------------------------
# pictures of the tracking handlers
# ----------------------------------------------------------------------------------------------
def _to_2d(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a if a.ndim in (2, 3) else None


def sample_figure(items: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("image", "label", "pred"),
                  max_items: int = 4, title: str = "") -> Any:
    """A matplotlib figure: one row per item, one panel per channel of each of ``keys`` (grey, own
    range, shown with its min and max).

    Args:
        items: dicts of (C, H, W) or (H, W) tensors/arrays (e.g. a MONAI engine's decollated output).
        keys: keys to show; missing ones are skipped.
        max_items: rows.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = []
    for it in list(items)[:max_items]:
        panels = []
        for k in keys:
            a = _to_2d(it.get(k)) if isinstance(it, Mapping) else None
            if a is None:
                continue
            chans = [a] if a.ndim == 2 else [a[c] for c in range(min(a.shape[0], 4))]
            panels += [(f"{k}[{c}]" if a.ndim == 3 else k, ch) for c, ch in enumerate(chans)]
        if panels:
            rows.append(panels)
    ncol = max((len(r) for r in rows), default=1)
    fig = Figure(figsize=(2.2 * ncol, 2.2 * max(len(rows), 1) + 0.4))
    for i, panels in enumerate(rows):
        for j, (name, a) in enumerate(panels):
            ax = fig.add_subplot(len(rows), ncol, i * ncol + j + 1)
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            ax.imshow(a, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_title(f"{name} [{lo:.2g}, {hi:.2g}]", fontsize=7)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _rate_figure(x: Any, y: Any, xlabel: str, ylabel: str, title: str) -> Any:
    """A detection-rate curve (rate in [0, 1] against ``x``) as a matplotlib Figure.

    Args:
        x: abscissae.
        y: rates.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, y, marker="o", ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def crop_gallery(
    rows: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray | None, str]]],
    path: str | os.PathLike,
    title: str = "",
    per_row: int = 10,
) -> Path:
    """Rows of small image crops, each outlined where a mask marks it, written as a PNG.

    Used to put side by side what a model keeps on MC-free tissue and the MCs it finds
    (``scripts/sweep_operating_point.py --gallery``). Each crop has its own grey window (1st-99.8th
    percentile), so faint and bright spots are both visible.

    Args:
        rows: ``{row label: [(crop (h, w), outline mask (h, w) or None, caption), ...]}``.
        path: output PNG (written atomically).
        title: figure title.
        per_row: crops shown per row (the first ones of each list).

    Returns:
        the written path.
    """
    if not rows:
        raise ValueError("crop_gallery: no rows")
    n_cols = max(1, min(per_row, max(len(v) for v in rows.values())))
    fig = _figure((1.3 * n_cols + 1.2, 1.5 * len(rows) + 0.6))
    if title:
        fig.suptitle(title, fontsize=9)
    for i, (label, crops) in enumerate(rows.items()):
        for j in range(n_cols):
            ax = fig.add_subplot(len(rows), n_cols, i * n_cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
            if j >= len(crops):
                ax.set_frame_on(False)
                continue
            crop, mask, caption = crops[j]
            crop = np.asarray(crop, np.float32)
            lo, hi = np.percentile(crop, [1.0, 99.8])
            ax.imshow(crop, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, interpolation="nearest")
            if mask is not None and np.any(mask):
                ax.contour(np.asarray(mask, np.float32), levels=[0.5], colors="red", linewidths=0.6)
            ax.set_title(caption, fontsize=6)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    return Path(path)
