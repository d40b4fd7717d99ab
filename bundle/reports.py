"""Pictures and tables for mcref: overlay PNGs, atomically written CSV files, markdown tables.

Everything here works on plain numpy arrays and python values; nothing depends on torch or
ignite, so the functions can be used from scripts, ignite handlers and tests alike.
Files are always written to a temporary name in the destination folder and then renamed with
``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["atomic_path", "overlay_png", "overlay_rgb", "write_csv_atomic", "markdown_table"]

PRED_RGB = (255, 0, 0)
TRUTH_RGB = (0, 255, 0)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """
    Context manager giving a temporary file name next to ``path``; on a clean exit the temporary
    file is renamed to ``path`` (``os.replace``), on an exception it is removed.

    Args:
        path: final destination. Its parent folder is created when missing.
        suffix: suffix of the temporary name (some writers pick the format from it).

    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=str(dest.parent))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _as_2d(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a 2-D numpy array, dropping leading singleton (channel/batch) dimensions."""
    if hasattr(x, "detach"):  # torch tensor / MetaTensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W) or (1, H, W), got shape {tuple(np.shape(x))}.")
    return arr


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


def overlay_rgb(
    image: np.ndarray,
    pred_mask: np.ndarray | None,
    truth_mask: np.ndarray | None = None,
    max_side: int = 1024,
    breast: np.ndarray | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """
    Render a mammogram with the predicted mask (red, filled) and the truth contour (green, a one pixel
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

    """
    img = _as_2d(image, "image").astype(np.float32)
    h, w = img.shape
    pred = np.zeros((h, w), bool) if pred_mask is None else _as_2d(pred_mask, "pred_mask") != 0
    truth = None if truth_mask is None else _as_2d(truth_mask, "truth_mask") != 0
    for name, m in (("pred_mask", pred), ("truth_mask", truth)):
        if m is not None and m.shape != (h, w):
            raise ValueError(f"{name} shape {m.shape} differs from image shape {(h, w)}.")

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
    gray = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    gray8 = np.round(gray * 255.0).astype(np.uint8)

    scale = min(1.0, float(max_side) / float(max(h, w)))
    oh, ow = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (oh, ow) != (h, w):
        gray8 = np.asarray(Image.fromarray(gray8).resize((ow, oh), Image.Resampling.BOX))
        size = int(math.ceil(1.0 / scale))  # about one output pixel
        pred = ndimage.maximum_filter(pred, size=size) if pred.any() else pred
        if truth is not None and truth.any():
            truth = ndimage.maximum_filter(truth, size=size)
    pred_s = _any_pool(pred, (oh, ow))
    rgb = np.repeat(gray8[..., None], 3, axis=2)
    rgb[pred_s] = PRED_RGB
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
) -> None:
    """
    Write an overlay PNG (see :func:`overlay_rgb`): grey mammogram, predicted mask in red, truth
    contour in green. The file is written atomically (temporary name + ``os.replace``).

    Args:
        image: (H, W) or (1, H, W) image.
        pred_mask: (H, W) predicted mask, or None.
        truth_mask: optional (H, W) truth mask, drawn as a green contour.
        path: destination ``.png`` file (required; parent folders are created).
        max_side: longest side of the PNG in pixels.
        breast: optional breast mask for the grey-level percentiles.
        percentiles: lower and upper breast percentile mapped to black and white.

    """
    if path is None:
        raise ValueError("overlay_png needs a destination path.")
    rgb = overlay_rgb(image, pred_mask, truth_mask, max_side=max_side, breast=breast, percentiles=percentiles)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")


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
