"""Pictures and tables for mcref: overlay PNGs, cluster zoom panels, atomically written CSV files,
markdown tables.

Everything here works on plain numpy arrays and python values; nothing depends on torch or
ignite, so the functions can be used from scripts, ignite handlers and tests alike.
Files are always written to a temporary name in the destination folder and then renamed with
``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from bundle.utils import as_2d, atomic_path  # noqa: F401  (atomic_path re-exported)

__all__ = [
    "atomic_path",
    "grey_levels",
    "outline",
    "overlay_png",
    "overlay_rgb",
    "cluster_panels_rgb",
    "cluster_panels_png",
    "write_csv_atomic",
    "markdown_table",
]

PRED_RGB = (255, 0, 0)
TRUTH_RGB = (0, 255, 0)
OVERLAY_STYLES = ("fill", "outline")
# outline style: ring starts ``OUTLINE_GAP`` px outside the mark and is ``OUTLINE_WIDTH`` px thick
OUTLINE_GAP = 1
OUTLINE_WIDTH = 2
_SPARSE_LIMIT = 4_000_000  # (set pixels) x (filter area) below which dilation works on coordinates




def _as_2d(x: Any, name: str) -> np.ndarray:
    """``x`` as a 2-D numpy array (:func:`bundle.utils.as_2d`)."""
    return as_2d(x, name)


def _any_pool(mask: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Downsample a boolean mask so that an output pixel is set when any input pixel in it is set."""
    h, w = mask.shape
    oh, ow = out_shape
    if (oh, ow) == (h, w):
        return mask.copy()
    out = np.zeros((oh, ow), dtype=bool)
    rows, cols = np.nonzero(mask)
    out[(rows * oh) // h, (cols * ow) // w] = True
    return out


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """``ndimage.maximum_filter(mask, size)`` for a boolean mask (same origin convention), computed
    on the coordinates of the set pixels when they are few (marks on a large image)."""
    size = int(size)
    if size <= 1 or not mask.any():
        return mask.copy()
    rows, cols = np.nonzero(mask)
    if rows.size * size * size > _SPARSE_LIMIT:
        return ndimage.maximum_filter(mask, size=size)
    h, w = mask.shape
    offs = np.arange(-(size - 1 - size // 2), size // 2 + 1)
    out = np.zeros_like(mask, dtype=bool)
    for dr in offs:
        r = rows + dr
        ok_r = (r >= 0) & (r < h)
        for dc in offs:
            c = cols + dc
            ok = ok_r & (c >= 0) & (c < w)
            out[r[ok], c[ok]] = True
    return out


def outline(mask: np.ndarray, gap: int = OUTLINE_GAP, width: int = OUTLINE_WIDTH) -> np.ndarray:
    """
    A ring around every object of a boolean mask: the pixels whose (chessboard) distance to the mask
    lies in ``(gap, gap + width]``. No ring pixel lies on or within ``gap`` pixels of any mask pixel,
    so what is under and right around a mark stays visible.

    Args:
        mask: (H, W) boolean mask.
        gap: pixels left free between the mask and the ring (0: the ring touches the mask).
        width: ring thickness in pixels.

    Returns:
        (H, W) boolean ring.
    """
    m = np.asarray(mask, dtype=bool)
    if width < 1:
        raise ValueError(f"outline width must be >= 1, got {width}")
    if gap < 0:
        raise ValueError(f"outline gap must be >= 0, got {gap}")
    inner = _dilate(m, 2 * gap + 1)
    outer = _dilate(m, 2 * (gap + width) + 1)
    return outer & ~inner


def grey_levels(
    image: np.ndarray, breast: np.ndarray | None = None, percentiles: tuple[float, float] = (1.0, 99.0)
) -> tuple[float, float]:
    """
    The intensities ``(lo, hi)`` that overlays map to black and white: the ``percentiles`` of the
    breast (or, without a usable breast mask, of the pixels above the image minimum).

    Args:
        image: (H, W) or (1, H, W) image.
        breast: optional (H, W) breast mask.
        percentiles: lower and upper percentile.

    Returns:
        ``(lo, hi)`` with ``hi > lo``.
    """
    img = _as_2d(image, "image").astype(np.float32)
    h, w = img.shape
    region = None
    if breast is not None:
        region = _as_2d(breast, "breast") != 0
        if region.shape != (h, w) or not region.any():
            region = None
    if region is None:
        finite = np.isfinite(img)
        region = finite & (img > np.min(img[finite])) if finite.any() else finite
        if not region.any():
            region = finite
    vals = img[region] if region.any() else np.zeros(1, np.float32)
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _grey8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    gray = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(gray * 255.0).astype(np.uint8)


def _check_style(style: str) -> None:
    if style not in OVERLAY_STYLES:
        raise ValueError(f"style must be one of {OVERLAY_STYLES}, got {style!r}")


def overlay_rgb(
    image: np.ndarray,
    pred_mask: np.ndarray | None,
    truth_mask: np.ndarray | None = None,
    max_side: int = 1024,
    breast: np.ndarray | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    style: str = "fill",
    levels: tuple[float, float] | None = None,
) -> np.ndarray:
    """
    Render a mammogram with the predicted mask in red and the truth contour (green, a one pixel
    ring just outside each truth object) as an ``(h, w, 3)`` uint8 array.

    The grey levels map the breast percentiles ``percentiles`` to 0 and 255. When the image is larger
    than ``max_side`` it is downsampled (box filter); the masks are first dilated by about one output
    pixel and then "any"-pooled, so that a single-pixel microcalcification stays visible.

    Args:
        image: (H, W) or (1, H, W) image, any intensity scale.
        pred_mask: (H, W) predicted mask (non-zero = positive), or None.
        truth_mask: optional (H, W) truth mask.
        max_side: longest side of the result in pixels; smaller images are not enlarged.
        breast: optional breast mask used for the grey-level percentiles; when None, pixels above the
            image minimum are used (all pixels when the image is constant).
        percentiles: lower and upper percentile mapped to black and white.
        style: ``"fill"`` paints the predicted pixels red; ``"outline"`` draws a red ring
            (:func:`outline`, ``OUTLINE_WIDTH`` output pixels thick, ``OUTLINE_GAP`` pixels away)
            around each mark instead, so the speck under a mark keeps its grey value.
        levels: ``(lo, hi)`` mapped to black and white, e.g. from :func:`grey_levels`; when given,
            ``breast`` and ``percentiles`` are not used.

    """
    _check_style(style)
    img = _as_2d(image, "image").astype(np.float32)
    h, w = img.shape
    pred = np.zeros((h, w), bool) if pred_mask is None else _as_2d(pred_mask, "pred_mask") != 0
    truth = None if truth_mask is None else _as_2d(truth_mask, "truth_mask") != 0
    for name, m in (("pred_mask", pred), ("truth_mask", truth)):
        if m is not None and m.shape != (h, w):
            raise ValueError(f"{name} shape {m.shape} differs from image shape {(h, w)}.")
    lo, hi = grey_levels(img, breast, percentiles) if levels is None else (float(levels[0]), float(levels[1]))
    if not hi > lo:
        hi = lo + 1.0
    gray8 = _grey8(img, lo, hi)

    scale = min(1.0, float(max_side) / float(max(h, w)))
    oh, ow = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (oh, ow) != (h, w):
        gray8 = np.asarray(Image.fromarray(gray8).resize((ow, oh), Image.Resampling.BOX))
        size = int(math.ceil(1.0 / scale))  # about one output pixel
        pred = _dilate(pred, size)
        if truth is not None and truth.any():
            truth = _dilate(truth, size)
    pred_s = _any_pool(pred, (oh, ow))
    rgb = np.repeat(gray8[..., None], 3, axis=2)
    rgb[outline(pred_s) if style == "outline" else pred_s] = PRED_RGB
    if truth is not None:
        truth_s = _any_pool(truth, (oh, ow))
        contour = ndimage.binary_dilation(truth_s, structure=np.ones((3, 3), bool)) & ~truth_s
        rgb[contour] = TRUTH_RGB
    return rgb


def overlay_png(
    image: np.ndarray,
    pred_mask: np.ndarray | None,
    truth_mask: np.ndarray | None = None,
    path: str | os.PathLike | None = None,
    max_side: int = 1024,
    breast: np.ndarray | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    style: str = "fill",
    levels: tuple[float, float] | None = None,
) -> None:
    """
    Write an overlay PNG (see :func:`overlay_rgb`): grey mammogram, predicted mask in red (filled,
    or outlined with ``style="outline"``), truth contour in green. The file is written atomically
    (temporary name + ``os.replace``).

    Args:
        image: (H, W) or (1, H, W) image.
        pred_mask: (H, W) predicted mask, or None.
        truth_mask: optional (H, W) truth mask, drawn as a green contour.
        path: destination ``.png`` file (required; parent folders are created).
        max_side: longest side of the PNG in pixels.
        breast: optional breast mask for the grey-level percentiles.
        percentiles: lower and upper breast percentile mapped to black and white.
        style: ``"fill"`` (default, as before) or ``"outline"``: a red ring around each mark, the
            pixels under it left grey.
        levels: optional ``(lo, hi)`` grey levels (see :func:`grey_levels`).

    """
    if path is None:
        raise ValueError("overlay_png needs a destination path.")
    rgb = overlay_rgb(image, pred_mask, truth_mask, max_side=max_side, breast=breast, percentiles=percentiles,
                      style=style, levels=levels)
    _save_png(rgb, path)


def _save_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(tmp, format="PNG")


PANEL_BACKGROUND = (32, 32, 32)
PANEL_TEXT_RGB = (255, 255, 0)
PANEL_HEADER_PX = 30
PANEL_SPACING_PX = 4


def _font(size: int = 12) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _fmt(v: Any, spec: str) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(f) else format(f, spec)


def _crop_window(centre: float, crop: int, size: int) -> tuple[int, int]:
    """Start and stop of a ``crop``-long window centred on ``centre`` and shifted to lie inside ``[0, size)``."""
    start = int(round(float(centre))) - crop // 2
    start = max(0, min(start, size - crop))
    return start, min(size, start + crop)


def cluster_panels_rgb(
    image: np.ndarray,
    mask: np.ndarray | None,
    clusters: Sequence[Mapping[str, Any]],
    crop: int = 256,
    max_panels: int = 4,
    zoom: int = 2,
    columns: int = 2,
    breast: np.ndarray | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    levels: tuple[float, float] | None = None,
) -> np.ndarray:
    """
    Full-resolution zoom panels around the strongest clusters as an ``(h, w, 3)`` uint8 array.

    Each panel is a ``crop`` x ``crop`` window of source pixels (never downsampled; enlarged
    ``zoom`` times, nearest neighbour) centred on a cluster (shifted to stay inside the image), with
    every mark of ``mask`` in the window outlined in red (:func:`outline`: ``zoom`` display pixels
    of gap, i.e. one source pixel, then a 2 pixel ring), and a header line with the cluster number,
    its number of marks, extent and maximum score. Panels are laid out ``columns`` per row. Without
    clusters a small "no clusters" image is returned.

    Args:
        image: (H, W) or (1, H, W) image on the grid of ``mask`` and of the cluster centres.
        mask: (H, W) final mask (non-zero = mark), or None.
        clusters: cluster dicts (``cluster``, ``centre_row``, ``centre_col``, ``n_marks``,
            ``extent_mm``, ``max_score``), strongest first, as from :func:`bundle.clusters.cluster_table`;
            the first ``max_panels`` are shown.
        crop: window side in source pixels (smaller images: the whole side).
        max_panels: largest number of panels.
        zoom: integer enlargement of each window (1: one screen pixel per source pixel).
        columns: panels per row.
        breast, percentiles, levels: grey levels as in :func:`overlay_rgb` (computed on the whole
            image, so all panels share them).

    """
    from PIL import ImageDraw

    img = _as_2d(image, "image")
    h, w = img.shape
    m = np.zeros((h, w), bool) if mask is None else _as_2d(mask, "mask") != 0
    if m.shape != (h, w):
        raise ValueError(f"mask shape {m.shape} differs from image shape {(h, w)}.")
    crop, zoom, columns = int(crop), max(1, int(zoom)), max(1, int(columns))
    if crop < 1:
        raise ValueError(f"crop must be >= 1, got {crop}")
    shown = list(clusters)[: max(0, int(max_panels))]
    font = _font(12)
    if not shown:
        canvas = Image.new("RGB", (256, 48), PANEL_BACKGROUND)
        ImageDraw.Draw(canvas).text((10, 16), "no clusters", fill=PANEL_TEXT_RGB, font=font)
        return np.asarray(canvas).copy()
    lo, hi = grey_levels(img, breast, percentiles) if levels is None else (float(levels[0]), float(levels[1]))
    if not hi > lo:
        hi = lo + 1.0
    side = crop * zoom
    n_cols = min(columns, len(shown))
    n_rows = int(math.ceil(len(shown) / n_cols))
    cell_w, cell_h = side, side + PANEL_HEADER_PX
    canvas = Image.new(
        "RGB",
        (n_cols * cell_w + (n_cols + 1) * PANEL_SPACING_PX, n_rows * cell_h + (n_rows + 1) * PANEL_SPACING_PX),
        PANEL_BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    for i, cl in enumerate(shown):
        r0, r1 = _crop_window(cl["centre_row"], crop, h)
        c0, c1 = _crop_window(cl["centre_col"], crop, w)
        grey = _grey8(np.asarray(img[r0:r1, c0:c1], dtype=np.float32), lo, hi)
        mk = m[r0:r1, c0:c1]
        if zoom > 1:
            grey = np.repeat(np.repeat(grey, zoom, axis=0), zoom, axis=1)
            mk = np.repeat(np.repeat(mk, zoom, axis=0), zoom, axis=1)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        rgb[outline(mk, gap=zoom, width=2)] = PRED_RGB
        x = PANEL_SPACING_PX + (i % n_cols) * (cell_w + PANEL_SPACING_PX)
        y = PANEL_SPACING_PX + (i // n_cols) * (cell_h + PANEL_SPACING_PX)
        canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)), (x, y + PANEL_HEADER_PX))
        label = (
            f"cluster {cl.get('cluster', i + 1)}: {cl.get('n_marks', '?')} marks, "
            f"{_fmt(cl.get('extent_mm'), '.1f')} mm, max {_fmt(cl.get('max_score'), '.2f')}"
        )
        where = f"rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1}"
        draw.text((x + 2, y + 1), label, fill=PANEL_TEXT_RGB, font=font)
        draw.text((x + 2, y + 15), where, fill=PANEL_TEXT_RGB, font=font)
    return np.asarray(canvas).copy()


def cluster_panels_png(
    image: np.ndarray,
    mask: np.ndarray | None,
    clusters: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    **kwargs: Any,
) -> None:
    """Write :func:`cluster_panels_rgb` (keyword arguments passed on) as a PNG, atomically."""
    _save_png(cluster_panels_rgb(image, mask, clusters, **kwargs), path)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            cols.setdefault(str(k), None)
    return list(cols)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # round-trips exactly, 'nan' for NaN
    if isinstance(v, (tuple, list)):
        return " ".join(str(_csv_value(x)) for x in v)
    return v


def write_csv_atomic(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str] | None = None
) -> None:
    """
    Write ``rows`` as a CSV file with a header line, atomically (temporary name + ``os.replace``).

    Floats are written with ``repr`` (exact round trip; NaN as ``nan``), ``None`` as an empty field,
    tuples/lists as space-separated values.

    Args:
        rows: one mapping per line.
        path: destination file; parent folders are created.
        columns: column order; by default the union of the keys in order of first appearance.
            Keys not listed are left out, missing keys give empty fields.

    """
    cols = list(columns) if columns is not None else _columns(rows)
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(row.get(k)) for k in cols})


def _md_value(v: Any, floatfmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(float(v)) else format(float(v), floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".3f",
    headers: Sequence[str] | None = None,
) -> str:
    """
    Format ``rows`` as a GitHub markdown table.

    Args:
        rows: one mapping per table row.
        columns: keys to show, in order; by default the union of the keys.
        floatfmt: ``format`` spec for floats (NaN is shown as ``n/a``).
        headers: column titles; by default the keys themselves.

    Returns:
        the table, one line per row, ending with a newline.

    """
    cols = list(columns) if columns is not None else _columns(rows)
    titles = list(headers) if headers is not None else cols
    if len(titles) != len(cols):
        raise ValueError(f"headers has {len(titles)} entries for {len(cols)} columns.")
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_value(row.get(c), floatfmt) for c in cols) + " |")
    return "\n".join(lines) + "\n"
