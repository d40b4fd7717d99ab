"""Microcalcification (MC) segmentation metrics and the ignite handlers that report them.

Pure functions (numpy in, python values out):

- :func:`pixel_stats`: pixel-level confusion counts, Dice, sensitivity (recall), PPV, activation
  rate, true activation rate, FNR, specificity, balanced accuracy, G-mean.
- :func:`object_stats`: truth MC objects (connected components), their equivalent diameter, whether
  any predicted-positive pixel touches them, and predicted components touching no truth object.
- :func:`aggregate`: mean over cases ignoring NaN, plus pooled object detection rate and pooled Dice
  (and pooled cluster sensitivity, object IoU and false marks per cm^2 when the rows have them).

Reader-facing detection metrics (``docs/metrics.md``, "Detection metrics"):

- :func:`object_iou`: IoU of each truth MC object with the predicted components overlapping it
  (HDoGReg's object IoU), mean over all truth objects and over the detected ones.
- :func:`truth_clusters`, :func:`cluster_stats`: MC clusters (>= 3 marks, single linkage 5 mm) of the
  truth and the prediction; detected truth clusters and false-positive clusters of one image.
- :func:`detection_curve`, :func:`pool_detection_curves`, :func:`interpolate_tpr`,
  :func:`curve_summary`: the same counts swept over probability thresholds, pooled over images into
  the cluster FROC (sensitivity vs false-positive clusters per image) and the object TPR vs false
  marks per cm^2 of breast, summarised at given rates.

Ignite pieces:

- :class:`MCMetricsHandler`: per-image metrics on every iteration, averages into
  ``engine.state.metrics`` at the end of each epoch, per-case CSV and overlay PNGs.
- :class:`ActivationRate`: an ignite ``Metric`` for MONAI ``key_val_metric``/``additional_metrics``.
- :class:`MLflowArtifactsHandler`: logs files, folders and the (merged) config to the MLflow run of a
  MONAI ``MLFlowHandler`` on the same engine, or to a run of its own.

Definitions follow the supplement of the generative-refinement paper (section E, see
``docs/metrics.md``); every metric is computed per image and averaged over images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from scipy import ndimage

from bundle.clusters import find_clusters, mark_table
from bundle.reports import overlay_png, write_csv_atomic
from bundle.utils import as_2d

__all__ = [
    "DEFAULT_METRIC_NAMES",
    "OBJECT_COLUMNS",
    "pixel_stats",
    "object_stats",
    "aggregate",
    "DEFAULT_SWEEP_THRESHOLDS",
    "DEFAULT_FROC_FP_RATES",
    "DEFAULT_FP_PER_CM2_RATES",
    "CURVE_COLUMNS",
    "object_iou",
    "truth_clusters",
    "cluster_stats",
    "detection_curve",
    "pool_detection_curves",
    "interpolate_tpr",
    "curve_summary",
    "curve_metric_names",
    "MCMetricsHandler",
    "ActivationRate",
    "MLflowArtifactsHandler",
    "resolve_tracking_uri",
]

NAN = float("nan")

#: summary entries that :class:`MCMetricsHandler` puts into ``engine.state.metrics``.
DEFAULT_METRIC_NAMES: tuple[str, ...] = (
    "dice",
    "sensitivity",
    "ppv",
    "activation_rate",
    "true_activation_rate",
    "fnr",
    "specificity",
    "balanced_accuracy",
    "g_mean",
    "object_detection_rate",
    "object_detection_rate_pooled",
    "image_detection_rate",
    "fp_objects_per_image",
    "fp_marks_per_image",
    "fp_clusters_per_image",
    "cluster_sensitivity_pooled",
    "object_iou_pooled",
    "object_iou_detected_pooled",
    "fp_marks_per_cm2_pooled",
)

#: probability thresholds of the detection sweeps (the study's default FROC grid); the operating
#: threshold is always added.
DEFAULT_SWEEP_THRESHOLDS: tuple[float, ...] = (
    0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99
)
#: false-positive clusters per image at which the cluster FROC is summarised (``froc_score``).
DEFAULT_FROC_FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: false-positive marks per cm^2 of breast at which the object TPR is reported (HDoGReg's operating points).
DEFAULT_FP_PER_CM2_RATES: tuple[float, ...] = (0.1, 0.5, 1.0)
#: columns of the pooled detection curve (:func:`pool_detection_curves`), one row per threshold.
CURVE_COLUMNS: tuple[str, ...] = (
    "threshold", "n_images", "n_truth_clusters", "detected_clusters", "cluster_sensitivity", "fp_clusters",
    "fp_clusters_per_image", "n_objects", "detected_objects", "object_tpr", "fp_marks", "fp_marks_per_image",
    "breast_area_cm2", "fp_marks_per_cm2",
)


#: columns of the per-object CSV written by :class:`MCMetricsHandler`.
OBJECT_COLUMNS: tuple[str, ...] = (
    "case", "object_id", "size_px", "diameter_mm", "centroid_row", "centroid_col", "detected", "included"
)

# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_2d(x: Any, name: str) -> np.ndarray:
    """``x`` as a 2-D array (:func:`bundle.utils.as_2d`)."""
    return as_2d(_to_numpy(x), name)


def _as_mask(x: Any, name: str) -> np.ndarray:
    """Boolean 2-D mask: non-zero pixels are positive."""
    arr = _as_2d(x, name)
    return arr if arr.dtype == bool else arr != 0


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else NAN


def _spacing_pair(spacing_mm: float | Sequence[float]) -> tuple[float, float]:
    sp = np.atleast_1d(np.asarray(_to_numpy(spacing_mm), dtype=float)).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, 2)
    if sp.size < 2 or not np.all(np.isfinite(sp[:2])) or np.any(sp[:2] <= 0):
        raise ValueError(f"spacing_mm must be a positive float or a (row, col) pair, got {spacing_mm!r}.")
    return float(sp[0]), float(sp[1])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating, np.bool_)) and not isinstance(v, str)


# ----------------------------------------------------------------------------------------------
# pure metric functions
# ----------------------------------------------------------------------------------------------
def _pred_truth_masks(pred: Any, truth: Any, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean prediction and truth of one shape, with a checked 2-D connectivity."""
    p = _as_mask(pred, "pred")
    t = _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from truth shape {t.shape}.")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2 for 2-D masks, got {connectivity}.")
    return p, t


def pixel_stats(pred: Any, truth: Any, breast: Any | None = None) -> dict[str, float | int]:
    """
    Pixel-level statistics of one image.

    ``tp``, ``fp`` and ``fn`` count the whole image; ``tn`` (and so specificity) counts only inside
    ``breast`` when given (else the whole image). Activation rates are relative to the breast area.

    Args:
        pred: (H, W) predicted mask (non-zero = positive); leading singleton dims are allowed.
        truth: (H, W) truth mask.
        breast: optional (H, W) breast mask; None means the whole image.

    Returns:
        dict with ``tp``, ``fp``, ``fn``, ``tn``, ``pred_px``, ``truth_px``, ``breast_px`` (ints) and
        ``dice`` (2TP/(2TP+FP+FN), 1.0 when both masks are empty), ``sensitivity`` (recall, TP/(TP+FN),
        NaN without truth), ``ppv`` (TP/(TP+FP), NaN without prediction), ``activation_rate``
        (predicted pixels in breast / breast pixels), ``true_activation_rate`` (truth pixels in breast /
        breast pixels), ``fnr`` (1 - sensitivity), ``specificity`` (TN / negatives in the breast),
        ``balanced_accuracy`` ((sensitivity + specificity) / 2) and ``g_mean``
        (sqrt(sensitivity * specificity)). Rates with a zero denominator are NaN.

    """
    p = _as_mask(pred, "pred")
    t = _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from truth shape {t.shape}.")
    if breast is None:
        region = np.ones_like(p)
    else:
        region = _as_mask(breast, "breast")
        if region.shape != p.shape:
            raise ValueError(f"breast shape {region.shape} differs from pred shape {p.shape}.")

    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(np.count_nonzero(~p & ~t & region))
    fp_region = int(np.count_nonzero(p & ~t & region))
    n_region = int(np.count_nonzero(region))

    dice = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp_region)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "pred_px": tp + fp,
        "truth_px": tp + fn,
        "breast_px": n_region,
        "dice": dice,
        "sensitivity": sens,
        "ppv": _ratio(tp, tp + fp),
        "activation_rate": _ratio(np.count_nonzero(p & region), n_region),
        "true_activation_rate": _ratio(np.count_nonzero(t & region), n_region),
        "fnr": 1.0 - sens,
        "specificity": spec,
        "balanced_accuracy": 0.5 * (sens + spec),
        "g_mean": math.sqrt(sens * spec) if not (math.isnan(sens) or math.isnan(spec)) else NAN,
    }


def object_stats(
    pred: Any,
    truth: Any,
    spacing_mm: float | Sequence[float],
    min_diameter_mm: float = 0.0,
    connectivity: int = 2,
    max_size_px: int | None = None,
    image: Any | None = None,
    ring_px: int = 3,
) -> dict[str, Any]:
    """
    Object-level statistics of one image.

    Truth objects are the connected components of ``truth`` (``connectivity=2``: 8-connectivity).
    An object is *detected* when at least one predicted-positive pixel lies inside it. Only objects
    with equivalent diameter ``>= min_diameter_mm`` (and ``size_px <= max_size_px`` when given) are
    *included* in ``n_objects``/``n_detected``/``detection_rate``; all objects are listed.

    Args:
        pred: (H, W) predicted mask (non-zero = positive).
        truth: (H, W) truth mask.
        spacing_mm: pixel spacing in mm, a float or a (row, col) pair.
        min_diameter_mm: smallest equivalent diameter of an included object.
        connectivity: 1 (4-connectivity) or 2 (8-connectivity), for truth and predicted components.
        max_size_px: when given, objects larger than this pixel count are excluded (the
            paper's patient-level analysis, supplement section F).
        image: optional (H, W) image; when given, each object also gets ``interior_density`` (mean
            image value inside it) and ``exterior_density`` (mean over a ring of ``ring_px`` pixels
            around it, other truth pixels excluded).
        ring_px: width of that ring in pixels.

    Returns:
        dict with ``n_objects``, ``n_detected``, ``detection_rate`` (NaN with no included object),
        ``image_detected`` (1.0 when an included object is detected, 0.0 when none is, NaN with no
        included object), ``n_objects_all``, ``n_pred_objects``, ``n_fp_objects`` (predicted
        components overlapping no truth pixel) and ``objects``: one dict per truth object with
        ``object_id``, ``size_px``, ``diameter_mm`` (2*sqrt(area_mm2/pi)), ``centroid_row``,
        ``centroid_col``, ``detected``, ``included`` (and the densities when ``image`` is given).

    """
    p, t = _pred_truth_masks(pred, truth, connectivity)
    row_mm, col_mm = _spacing_pair(spacing_mm)
    structure = ndimage.generate_binary_structure(2, connectivity)

    labels, n_all = ndimage.label(t, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n_all + 1)[1:]
    hits = np.bincount(labels[p], minlength=n_all + 1)[1:] > 0
    diameters = 2.0 * np.sqrt(sizes * row_mm * col_mm / math.pi)
    included = diameters >= min_diameter_mm * (1.0 - 1e-9)
    if max_size_px is not None:
        included &= sizes <= max_size_px
    centroids = ndimage.center_of_mass(t, labels, range(1, n_all + 1)) if n_all else []

    img = None
    if image is not None:
        img = _as_2d(image, "image").astype(np.float64)
        if img.shape != t.shape:
            raise ValueError(f"image shape {img.shape} differs from truth shape {t.shape}.")
    slices = ndimage.find_objects(labels) if img is not None else []

    objects: list[dict[str, Any]] = []
    for i in range(n_all):
        obj: dict[str, Any] = {
            "object_id": i + 1,
            "size_px": int(sizes[i]),
            "diameter_mm": float(diameters[i]),
            "centroid_row": float(centroids[i][0]),
            "centroid_col": float(centroids[i][1]),
            "detected": bool(hits[i]),
            "included": bool(included[i]),
        }
        if img is not None:
            sl = slices[i]
            r0, r1 = max(sl[0].start - ring_px, 0), min(sl[0].stop + ring_px, t.shape[0])
            c0, c1 = max(sl[1].start - ring_px, 0), min(sl[1].stop + ring_px, t.shape[1])
            lab = labels[r0:r1, c0:c1]
            inside = lab == i + 1
            ring = ndimage.binary_dilation(inside, structure=np.ones((3, 3), bool), iterations=ring_px) & (lab == 0)
            crop = img[r0:r1, c0:c1]
            obj["interior_density"] = float(crop[inside].mean())
            obj["exterior_density"] = float(crop[ring].mean()) if ring.any() else NAN
        objects.append(obj)

    n_obj = int(np.count_nonzero(included))
    n_det = int(np.count_nonzero(included & hits))
    plabels, n_pred_obj = ndimage.label(p, structure=structure)
    touching = np.unique(plabels[t & (plabels > 0)])
    return {
        "n_objects": n_obj,
        "n_detected": n_det,
        "detection_rate": _ratio(n_det, n_obj),
        "image_detected": (1.0 if n_det > 0 else 0.0) if n_obj else NAN,
        "n_objects_all": int(n_all),
        "n_pred_objects": int(n_pred_obj),
        "n_fp_objects": int(n_pred_obj - touching.size),
        "objects": objects,
    }


def aggregate(per_case: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """
    Average per-case statistics over cases.

    Every numeric entry is averaged over the cases that have it, ignoring NaN (``nanmean``; NaN when
    no case has a value). Non-numeric entries (names, object lists) are skipped. Pooled values are
    added when their counts are present:

    - ``object_detection_rate_pooled`` = sum of ``n_detected`` / sum of ``n_objects``;
    - ``dice_pooled`` = 2 sum TP / (2 sum TP + sum FP + sum FN);
    - ``cluster_sensitivity_pooled`` = sum of ``n_detected_clusters`` / sum of ``n_truth_clusters``
      (images without a truth cluster add nothing);
    - ``fp_marks_per_cm2_pooled`` = sum of ``n_fp_objects`` / sum of ``breast_area_cm2``;
    - ``object_iou_pooled`` = mean IoU over all truth objects of all cases (``object_iou`` weighted by
      ``n_objects_all``) and ``object_iou_detected_pooled`` (``object_iou_detected`` weighted by
      ``n_detected_all``).

    Args:
        per_case: one mapping per case, e.g. ``{**pixel_stats(...), **object_stats(...)}``.

    Returns:
        dict of floats, plus ``n_cases``.

    """
    keys: dict[str, None] = {}
    for row in per_case:
        for k, v in row.items():
            if _is_number(v) or v is None:
                keys.setdefault(k, None)
    out: dict[str, float] = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in per_case if _is_number(r.get(k))], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = float(vals.mean()) if vals.size else NAN
    out["n_cases"] = float(len(per_case))

    def total(key: str) -> float | None:
        vals = [float(r[key]) for r in per_case if _is_number(r.get(key))]
        return float(np.sum(vals)) if vals else None

    n_obj, n_det = total("n_objects"), total("n_detected")
    if n_obj is not None and n_det is not None:
        out["object_detection_rate_pooled"] = _ratio(n_det, n_obj)
    tp, fp, fn = total("tp"), total("fp"), total("fn")
    if tp is not None and fp is not None and fn is not None:
        out["dice_pooled"] = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)
    n_tc, n_dc = total("n_truth_clusters"), total("n_detected_clusters")
    if n_tc is not None and n_dc is not None:
        out["cluster_sensitivity_pooled"] = _ratio(n_dc, n_tc)
    n_fpo, area = total("n_fp_objects"), total("breast_area_cm2")
    if n_fpo is not None and area is not None:
        out["fp_marks_per_cm2_pooled"] = _ratio(n_fpo, area)
    for key, count in (("object_iou", "n_objects_all"), ("object_iou_detected", "n_detected_all")):
        pairs = [(float(r[key]), float(r[count])) for r in per_case
                 if _is_number(r.get(key)) and _is_number(r.get(count)) and not math.isnan(float(r[key]))]
        if pairs or any(key in r for r in per_case):
            n = sum(c for _, c in pairs)
            out[f"{key}_pooled"] = _ratio(sum(v * c for v, c in pairs), n)
    return out


# ----------------------------------------------------------------------------------------------
# reader-facing detection metrics: false marks, clusters, object IoU, FROC, TPR at FP/cm^2
# ----------------------------------------------------------------------------------------------
def _area_cm2(n_px: int, spacing: tuple[float, float]) -> float:
    return float(n_px) * spacing[0] * spacing[1] / 100.0


def object_iou(pred: Any, truth: Any, connectivity: int = 2) -> dict[str, Any]:
    """
    Object IoU (HDoGReg, Marasinou et al. 2021): for each truth MC object, the intersection over
    union of the object and the union of the predicted components that overlap it.

    Truth objects and predicted components are connected components (``connectivity=2``:
    8-connectivity). An object no predicted component overlaps is undetected and has IoU 0. A
    predicted component that spans two objects counts, whole, in the union of both.

    Args:
        pred: (H, W) predicted mask (non-zero = positive); leading singleton dims are allowed.
        truth: (H, W) truth mask.
        connectivity: 1 (4-connectivity) or 2 (8-connectivity).

    Returns:
        dict with ``n_objects`` (all truth objects), ``n_detected`` (objects with IoU > 0), ``iou``
        ((n_objects,) float array, object ``i`` labelled ``i + 1`` like :func:`object_stats`),
        ``object_iou`` (mean over all objects, NaN without objects) and ``object_iou_detected`` (mean
        over the detected ones, NaN when none is detected).

    """
    p, t = _pred_truth_masks(pred, truth, connectivity)
    structure = ndimage.generate_binary_structure(2, connectivity)
    tl, n_t = ndimage.label(t, structure=structure)
    if n_t == 0:
        return {"n_objects": 0, "n_detected": 0, "iou": np.zeros(0), "object_iou": NAN, "object_iou_detected": NAN}
    pl, n_p = ndimage.label(p, structure=structure)
    t_sizes = np.bincount(tl.ravel(), minlength=n_t + 1)[1:].astype(float)
    inter = np.bincount(tl[p], minlength=n_t + 1)[1:].astype(float)  # predicted pixels inside each object
    both = (tl > 0) & (pl > 0)
    codes = np.unique(tl[both].astype(np.int64) * (n_p + 1) + pl[both])
    to, po = codes // (n_p + 1), codes % (n_p + 1)  # (truth object, predicted component) pairs that overlap
    p_sizes = np.bincount(pl.ravel(), minlength=n_p + 1).astype(float)
    pred_union = np.bincount(to, weights=p_sizes[po], minlength=n_t + 1)[1:]
    iou = inter / (t_sizes + pred_union - inter)
    detected = inter > 0
    return {
        "n_objects": int(n_t),
        "n_detected": int(detected.sum()),
        "iou": iou,
        "object_iou": float(iou.mean()),
        "object_iou_detected": float(iou[detected].mean()) if detected.any() else NAN,
    }


def truth_clusters(
    truth: Any,
    spacing_mm: float | Sequence[float],
    link_mm: float = 5.0,
    min_count: int = 3,
    connectivity: int = 2,
    member_min_diameter_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """
    Truth MC objects and their clusters: single-linkage groups of object centres (``link_mm``) with
    at least ``min_count`` objects (:func:`bundle.clusters.find_clusters`).

    With ``member_min_diameter_mm`` > 0 only objects of at least that equivalent diameter are
    cluster members (a cluster made only of 0.1 mm specks, one pixel at 0.1 mm, is then not a
    truth cluster; the smaller objects get cluster id -1).

    Args:
        truth: (H, W) truth mask.
        spacing_mm: pixel spacing in mm, a float or a (row, col) pair.
        link_mm: linking distance between object centres in mm.
        min_count: smallest number of objects of a cluster.
        connectivity: 1 (4-connectivity) or 2 (8-connectivity).
        member_min_diameter_mm: smallest equivalent diameter of a cluster member.

    Returns:
        ``(labels, cluster_ids, n_clusters)``: (H, W) int32 object labels 1..n (the numbering of
        :func:`object_stats`), (n,) cluster of each object (-1: none) and the number of clusters.

    """
    t = _as_mask(truth, "truth")
    row_mm, col_mm = _spacing_pair(spacing_mm)
    labels, marks = mark_table(t, spacing_mm=(row_mm, col_mm), connectivity=connectivity)
    cents = np.array([[m["row"] * row_mm, m["col"] * col_mm] for m in marks], dtype=float).reshape(-1, 2)
    diam = 2.0 * np.sqrt(np.array([m["size_px"] for m in marks], dtype=float) * row_mm * col_mm / math.pi)
    member = diam >= member_min_diameter_mm * (1.0 - 1e-9)
    ids = np.full(len(marks), -1, dtype=int)
    sub, n_clusters = find_clusters(cents[member], link_mm, min_count)
    ids[member] = sub
    return labels, ids, int(n_clusters)


def _cluster_counts(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    # bundle.study imports this module: import its cluster machinery when first needed
    from bundle.objects import cluster_counts

    return cluster_counts(*args, **kwargs)


def cluster_stats(
    pred: Any,
    truth: Any,
    spacing_mm: float | Sequence[float],
    link_mm: float = 5.0,
    min_count: int = 3,
    min_hit_mcs: int = 1,
    connectivity: int = 2,
    member_min_diameter_mm: float = 0.0,
) -> dict[str, float | int]:
    """
    MC clusters of one binary prediction against the truth.

    Marks are the connected components of ``pred`` (the whole image, as ``n_fp_objects`` of
    :func:`object_stats`); a cluster is a single-linkage group (``link_mm``, default 5 mm) of at least
    ``min_count`` (default 3) mark centres; truth clusters are built the same way from the truth
    objects (:func:`truth_clusters`). A truth cluster is detected when one predicted cluster hits
    (shares a pixel with) at least ``min_hit_mcs`` of its objects; a predicted cluster none of whose
    marks touches a truth object is a false-positive cluster (one touching only truth objects
    outside any truth cluster is neither). Counting is ``bundle.study.cluster_counts``. On an image
    without MCs every predicted cluster is a false positive.

    Args:
        pred: (H, W) predicted mask (non-zero = positive).
        truth: (H, W) truth mask.
        spacing_mm: pixel spacing in mm, a float or a (row, col) pair.
        link_mm: linking distance in mm.
        min_count: smallest number of marks (objects) of a cluster.
        min_hit_mcs: objects of a truth cluster one predicted cluster must hit.
        connectivity: 1 (4-connectivity) or 2 (8-connectivity).
        member_min_diameter_mm: smallest truth object that counts as a cluster member
            (:func:`truth_clusters`).

    Returns:
        dict with ``n_pred_clusters``, ``n_fp_clusters``, ``n_truth_clusters``,
        ``n_detected_clusters`` and ``cluster_sensitivity`` (detected / truth clusters, NaN without a
        truth cluster).

    """
    p = _as_mask(pred, "pred")
    t = _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from truth shape {t.shape}.")
    labels, ids, n_tc = truth_clusters(t, spacing_mm, link_mm, min_count, connectivity, member_min_diameter_mm)
    cc = _cluster_counts(
        p.astype(np.float32), [0.5], labels, ids, n_tc, _spacing_pair(spacing_mm), None, link_mm, min_count,
        min_hit_mcs, 1, connectivity,
    )
    n_det = int(cc["detected"][0])
    return {
        "n_pred_clusters": int(cc["pred_clusters"][0]),
        "n_fp_clusters": int(cc["fp"][0]),
        "n_truth_clusters": n_tc,
        "n_detected_clusters": n_det,
        "cluster_sensitivity": _ratio(n_det, n_tc),
    }


def detection_curve(
    prob: Any,
    truth: Any,
    spacing_mm: float | Sequence[float],
    thresholds: Sequence[float] = DEFAULT_SWEEP_THRESHOLDS,
    breast: Any | None = None,
    min_diameter_mm: float = 0.0,
    max_size_px: int | None = None,
    link_mm: float = 5.0,
    min_count: int = 3,
    min_hit_mcs: int = 1,
    connectivity: int = 2,
) -> dict[str, Any]:
    """
    Detection counts of one image swept over probability thresholds (one point per threshold).

    At threshold ``t`` the prediction is ``prob >= t``; its marks (connected components, whole image)
    and clusters are counted as in :func:`cluster_stats`, a mark touching no truth pixel is a false
    mark (``n_fp_objects`` of :func:`object_stats`), and a truth object is detected when a
    predicted-positive pixel falls inside it. Only objects of equivalent diameter
    ``>= min_diameter_mm`` (and ``size_px <= max_size_px`` when given) count for the object TPR. The
    breast area (whole image without ``breast``) normalises the false marks per cm^2.

    Args:
        prob: (H, W) probability map (NaN counts as 0).
        truth: (H, W) truth mask.
        spacing_mm: pixel spacing in mm, a float or a (row, col) pair.
        thresholds: probability thresholds.
        breast: optional (H, W) breast mask, for the area only.
        min_diameter_mm: smallest equivalent diameter of a truth object counted for the TPR.
        max_size_px: optional largest truth object (pixels) counted for the TPR.
        link_mm: cluster linking distance in mm.
        min_count: smallest number of marks of a cluster.
        min_hit_mcs: objects of a truth cluster one predicted cluster must hit.
        connectivity: 1 (4-connectivity) or 2 (8-connectivity).

    Returns:
        dict with ``thresholds`` (T,), the per-image totals ``n_objects`` (objects counted for the
        TPR), ``n_truth_clusters`` and ``breast_area_cm2``, and (T,) int arrays ``detected_objects``,
        ``fp_marks``, ``pred_marks``, ``detected_clusters``, ``fp_clusters``, ``pred_clusters``.

    """
    p = np.nan_to_num(_as_2d(prob, "prob").astype(np.float32), nan=0.0)
    t = _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"prob shape {p.shape} differs from truth shape {t.shape}.")
    spacing = _spacing_pair(spacing_mm)
    if breast is None:
        n_breast = p.size
    else:
        b = _as_mask(breast, "breast")
        if b.shape != p.shape:
            raise ValueError(f"breast shape {b.shape} differs from prob shape {p.shape}.")
        n_breast = int(np.count_nonzero(b))
    thr = np.asarray(list(thresholds), dtype=float).reshape(-1)
    labels, ids, n_tc = truth_clusters(t, spacing, link_mm, min_count, connectivity)
    cc = _cluster_counts(p, thr, labels, ids, n_tc, spacing, None, link_mm, min_count, min_hit_mcs, 1, connectivity)

    n_all = len(ids)
    if n_all:
        sizes = np.bincount(labels.ravel(), minlength=n_all + 1)[1:]
        diameters = 2.0 * np.sqrt(sizes * spacing[0] * spacing[1] / math.pi)
        included = diameters >= min_diameter_mm * (1.0 - 1e-9)
        if max_size_px is not None:
            included &= sizes <= max_size_px
        maxp = np.asarray(ndimage.maximum(p, labels, index=np.arange(1, n_all + 1)), dtype=float).reshape(n_all)
        detected = (maxp[included][None, :] >= thr[:, None]).sum(axis=1)
    else:
        included = np.zeros(0, bool)
        detected = np.zeros(len(thr), dtype=int)
    return {
        "thresholds": thr,
        "n_objects": int(included.sum()),
        "n_truth_clusters": int(n_tc),
        "breast_area_cm2": _area_cm2(n_breast, spacing),
        "detected_objects": detected.astype(int),
        "fp_marks": np.asarray(cc["fp_objects"], dtype=int),
        "pred_marks": np.asarray(cc["pred_objects"], dtype=int),
        "detected_clusters": np.asarray(cc["detected"], dtype=int),
        "fp_clusters": np.asarray(cc["fp"], dtype=int),
        "pred_clusters": np.asarray(cc["pred_clusters"], dtype=int),
    }


def pool_detection_curves(curves: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """
    Pool per-image :func:`detection_curve` results (same thresholds) into the study-level curves.

    Cluster sensitivity and false-positive clusters per image come from ``bundle.study.froc_curve``
    (sum detected / sum truth clusters; sum FP clusters / number of images); the object TPR is sum
    detected / sum counted objects; false marks per cm^2 is sum of false marks / sum of breast areas.

    Args:
        curves: one :func:`detection_curve` dict per image.

    Returns:
        dict of (T,) arrays named as :data:`CURVE_COLUMNS` (ratios NaN when their denominator is 0).

    Raises:
        ValueError: when the images were swept over different thresholds.

    """
    from bundle.objects import froc_curve

    if not curves:
        return {k: np.zeros(0) for k in CURVE_COLUMNS}
    thr = np.asarray(curves[0]["thresholds"], dtype=float)
    for c in curves[1:]:
        other = np.asarray(c["thresholds"], dtype=float)
        if other.shape != thr.shape or not np.allclose(other, thr):
            raise ValueError("all images must be swept over the same thresholds.")
    n_img = len(curves)
    T = len(thr)

    def stack(key: str) -> np.ndarray:
        return np.array([np.asarray(c[key], dtype=float) for c in curves]).reshape(n_img, T)

    n_tc = np.array([float(c["n_truth_clusters"]) for c in curves])
    fpi, sens = froc_curve(stack("detected_clusters"), stack("fp_clusters"), n_tc)
    n_obj = float(sum(c["n_objects"] for c in curves))
    area = float(sum(c["breast_area_cm2"] for c in curves))
    det_obj, fp_marks = stack("detected_objects").sum(axis=0), stack("fp_marks").sum(axis=0)
    return {
        "threshold": thr,
        "n_images": np.full(T, float(n_img)),
        "n_truth_clusters": np.full(T, n_tc.sum()),
        "detected_clusters": stack("detected_clusters").sum(axis=0),
        "cluster_sensitivity": np.asarray(sens, dtype=float),
        "fp_clusters": stack("fp_clusters").sum(axis=0),
        "fp_clusters_per_image": np.asarray(fpi, dtype=float),
        "n_objects": np.full(T, n_obj),
        "detected_objects": det_obj,
        "object_tpr": det_obj / n_obj if n_obj else np.full(T, NAN),
        "fp_marks": fp_marks,
        "fp_marks_per_image": fp_marks / n_img,
        "breast_area_cm2": np.full(T, area),
        "fp_marks_per_cm2": fp_marks / area if area > 0 else np.full(T, NAN),
    }


def interpolate_tpr(fp_rate: Any, tpr: Any, targets: Sequence[float]) -> np.ndarray:
    """
    True-positive rate of a swept detector at given false-positive rates, linearly interpolated.

    The operating points are sorted by false-positive rate; each TPR is replaced by the best TPR at
    or below its rate (running maximum), the point (0, 0) (a threshold above every probability) is
    added, and the TPR at each target is interpolated linearly between neighbouring points (a
    random mix of the two thresholds reaches any point between them). Beyond the largest rate the
    curve stays at its last TPR (a detector may stop short of a rate). Points with a NaN coordinate
    are ignored; with no valid point, or a NaN TPR everywhere, the result is NaN.

    Args:
        fp_rate: (T,) false-positive rates of the operating points (e.g. false marks per cm^2).
        tpr: (T,) true-positive rates of the same points.
        targets: false-positive rates to read the TPR at.

    Returns:
        (len(targets),) float array.

    """
    x = np.asarray(_to_numpy(fp_rate), dtype=float).reshape(-1)
    y = np.asarray(_to_numpy(tpr), dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"fp_rate and tpr differ in length: {x.shape} vs {y.shape}.")
    tg = np.asarray(list(targets), dtype=float).reshape(-1)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return np.full(tg.shape, NAN)
    x, y = x[ok], y[ok]
    order = np.lexsort((y, x))
    x, y = np.concatenate([[0.0], x[order]]), np.concatenate([[0.0], y[order]])
    y = np.maximum.accumulate(y)
    ux, last = np.unique(x[::-1], return_index=True)  # last occurrence of each rate: its best TPR
    uy = y[::-1][last]
    return np.interp(tg, ux, uy)


def _rate_key(value: float) -> str:
    return f"{float(value):g}"


def curve_metric_names(
    froc_fp_rates: Sequence[float] = DEFAULT_FROC_FP_RATES,
    fp_per_cm2_rates: Sequence[float] = DEFAULT_FP_PER_CM2_RATES,
) -> tuple[str, ...]:
    """
    Names of the entries :func:`curve_summary` returns.

    Args:
        froc_fp_rates: FP clusters per image of the FROC summary.
        fp_per_cm2_rates: false marks per cm^2 of the TPR read-outs.

    Returns:
        ``froc_score``, ``froc_sens_at_<f>`` for each FROC rate and ``tpr_at_<r>_fp_per_cm2`` for each
        rate per cm^2 (rates written with ``%g``).

    """
    return (
        ("froc_score",)
        + tuple(f"froc_sens_at_{_rate_key(f)}" for f in froc_fp_rates)
        + tuple(f"tpr_at_{_rate_key(r)}_fp_per_cm2" for r in fp_per_cm2_rates)
    )


def curve_summary(
    pooled: Mapping[str, Any],
    froc_fp_rates: Sequence[float] = DEFAULT_FROC_FP_RATES,
    fp_per_cm2_rates: Sequence[float] = DEFAULT_FP_PER_CM2_RATES,
) -> dict[str, float]:
    """
    Summary values of a pooled detection curve (:func:`pool_detection_curves`).

    - ``froc_sens_at_<f>`` and ``froc_score``: ``bundle.study.froc_summary`` of the cluster FROC,
      i.e. the best cluster sensitivity among the points with at most ``f`` FP clusters per image (0
      when none is that low), and their mean over ``froc_fp_rates``; NaN without truth clusters.
    - ``tpr_at_<r>_fp_per_cm2``: :func:`interpolate_tpr` of the object TPR against the false marks
      per cm^2 of breast; NaN without counted truth objects.

    Args:
        pooled: the pooled curve.
        froc_fp_rates: FP clusters per image of the FROC summary.
        fp_per_cm2_rates: false marks per cm^2 of the TPR read-outs.

    Returns:
        dict named as :func:`curve_metric_names`.

    """
    from bundle.objects import froc_summary

    fpi = np.asarray(pooled.get("fp_clusters_per_image", []), dtype=float)
    sens = np.asarray(pooled.get("cluster_sensitivity", []), dtype=float)
    out: dict[str, float] = {}
    fs = froc_summary(fpi, sens, list(froc_fp_rates)) if fpi.size else {}
    out["froc_score"] = float(fs.get("froc_score", NAN))
    for f in froc_fp_rates:
        out[f"froc_sens_at_{_rate_key(f)}"] = float(fs.get(f"sens_at_{f:g}", NAN))
    tprs = interpolate_tpr(pooled.get("fp_marks_per_cm2", []), pooled.get("object_tpr", []), list(fp_per_cm2_rates))
    for r, v in zip(fp_per_cm2_rates, tprs):
        out[f"tpr_at_{_rate_key(r)}_fp_per_cm2"] = float(v)
    return out


# ----------------------------------------------------------------------------------------------
# batch / meta helpers for the handlers
# ----------------------------------------------------------------------------------------------
def _decollate(data: Any) -> list[Any] | None:
    """Split a collated batch (dict of batched tensors, or batched tensor) into a list of items."""
    if data is None:
        return None
    if isinstance(data, (list, tuple)):
        return list(data)
    from monai.transforms import Decollated

    # like MONAI workflows: scalars are replicated, MetaTensor meta data is split per item
    return list(Decollated(keys=None, detach=True)(data))


def _get(item: Any, key: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(key)
    return None


def _py(v: Any) -> Any:
    """Plain python value from tensors / numpy values (meta data after decollation)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    return v


def _meta_of(item: Any, keys: Iterable[str]) -> dict[str, Any]:
    """Meta data of the first key in ``keys`` that carries any (MetaTensor ``.meta`` or ``<key>_meta_dict``)."""
    for key in keys:
        value = _get(item, key)
        meta = getattr(value, "meta", None)
        if isinstance(meta, Mapping) and meta:
            return dict(meta)
        meta = _get(item, f"{key}_meta_dict")
        if isinstance(meta, Mapping) and meta:
            return dict(meta)
    return {}


def _shape_eq(value: Any, shape: tuple[int, int]) -> bool:
    try:
        return [int(x) for x in _py(value)][-2:] == list(shape)
    except (TypeError, ValueError):
        return False


def _spacing_from_meta(meta: Mapping[str, Any], shape: tuple[int, int]) -> tuple[float, float] | None:
    """Pick the spacing that belongs to the grid of ``shape`` (working grid or source grid)."""
    working, source = meta.get("working_spacing"), meta.get("spacing")
    candidates = []
    if working is not None and _shape_eq(meta.get("working_shape"), shape):
        candidates.append(working)
    if source is not None and _shape_eq(meta.get("original_shape"), shape):
        candidates.append(source)
    candidates += [v for v in (working, source) if v is not None]
    pixdim = meta.get("pixdim")
    if pixdim is not None:
        pd = _py(pixdim)
        if isinstance(pd, list) and len(pd) >= 3:
            candidates.append(pd[1:3])
    for cand in candidates:
        try:
            return _spacing_pair(_py(cand))
        except (TypeError, ValueError):
            continue
    return None


def _case_name(meta: Mapping[str, Any], index: int) -> tuple[str, str]:
    filename = _py(meta.get("filename_or_obj", "")) or ""
    filename = str(filename)
    stem = _py(meta.get("stem"))
    if not stem and filename:
        stem = Path(filename).name.split(".")[0]
    return (str(stem) if stem else f"case_{index:04d}"), filename


# ----------------------------------------------------------------------------------------------
# ignite handler
# ----------------------------------------------------------------------------------------------
class MCMetricsHandler:
    """
    Ignite handler computing :func:`pixel_stats`, :func:`object_stats`, :func:`object_iou` and the
    cluster counts of :func:`cluster_stats` for every image of every iteration and, at the end of
    each epoch, putting the averages (:func:`aggregate`) into ``engine.state.metrics`` so that MONAI
    ``StatsHandler``/``MLFlowHandler``/``TensorBoardStatsHandler`` log them (attach this handler
    before those). With ``sweep_thresholds`` it also sweeps each probability map
    (:func:`detection_curve`) and adds the pooled cluster FROC and the object TPR at given false
    marks per cm^2 (:func:`curve_summary`).

    Inputs per iteration: ``engine.state.output`` is a list of dicts (MONAI engines with
    ``decollate=True``) or a dict of batched tensors, holding ``pred_key`` (probability, (C, H, W));
    ``label_key``, ``breast_key`` and ``image_key`` are taken from the output item when present,
    else from ``engine.state.batch`` (list of dicts or collated dict). Case names and spacing come
    from the image meta data (``stem``/``filename_or_obj``; ``working_spacing`` or ``spacing``, the
    one whose grid matches the prediction shape).

    Args:
        threshold: probability threshold; a pixel is positive when ``pred >= threshold``.
        min_diameter_mm: smallest equivalent diameter of a truth object counted for object detection.
        pred_key: key of the probability map in the output items.
        label_key: key of the truth mask.
        breast_key: key of the breast mask; without one, the whole image is the breast.
        image_key: key of the image (meta data and overlay background).
        csv_path: when given, the per-case table is written there (atomically) at each epoch end.
        overlay_dir: when given, ``<case>_overlay.png`` is written there for the first
            ``max_overlays`` cases of each epoch.
        max_overlays: number of overlays per epoch.
        prefix: prefix of the names put into ``engine.state.metrics`` (e.g. ``"val_"``).
        objects_csv_path: when given, the per-object table (all truth objects of all cases).
        spacing_mm: spacing in mm to use instead of the meta data (float or (row, col)).
        default_spacing_mm: spacing used, with a warning, when the meta data has none.
        max_object_size_px: optional upper object size (pixels) for object detection.
        pred_channel: channel of ``pred`` holding the MC probability; None: 0 for one channel,
            else the last channel.
        metric_names: summary entries copied into ``engine.state.metrics`` (with the sweep, the
            names of :func:`curve_metric_names` are added).
        overlay_max_side: longest side of the overlay PNGs.
        name: logger name.
        cluster_link_mm: single-linkage distance between mark centres of a cluster, in mm.
        cluster_min_count: smallest number of marks of a cluster.
        cluster_min_hit_mcs: objects of a truth cluster one predicted cluster must hit to detect it.
        sweep_thresholds: probability thresholds of the detection sweep (the operating threshold is
            added), e.g. :data:`DEFAULT_SWEEP_THRESHOLDS`; None (default) for no sweep. The sweep
            costs one labelling and clustering per threshold and image.
        froc_fp_rates: FP clusters per image of the FROC summary (``froc_sens_at_<f>``, ``froc_score``).
        fp_per_cm2_rates: false marks per cm^2 of breast at which the object TPR is read
            (``tpr_at_<r>_fp_per_cm2``).
        curve_csv_path: when given (and sweeping), the pooled curve (:data:`CURVE_COLUMNS`, one row
            per threshold) is written there at each epoch end.

    Attributes:
        rows: per-case dicts of the last (or current) epoch.
        object_rows: per-object dicts of the last epoch (with the case name).
        curves: per-case :func:`detection_curve` dicts of the last epoch (with the sweep).
        curve: the pooled curve of the last epoch (:func:`pool_detection_curves`), empty without sweep.
        summary: :func:`aggregate` of ``rows`` after the last epoch, with the aliases
            ``image_detection_rate``, ``fp_objects_per_image`` = ``fp_marks_per_image`` and
            ``fp_clusters_per_image``, and the :func:`curve_summary` entries with the sweep.

    """

    def __init__(
        self,
        threshold: float = 0.5,
        min_diameter_mm: float = 0.2,
        pred_key: str = "pred",
        label_key: str = "label",
        breast_key: str | None = "breast",
        image_key: str | None = "image",
        csv_path: str | os.PathLike | None = None,
        overlay_dir: str | os.PathLike | None = None,
        max_overlays: int = 8,
        prefix: str = "",
        objects_csv_path: str | os.PathLike | None = None,
        spacing_mm: float | Sequence[float] | None = None,
        default_spacing_mm: float = 0.07,
        max_object_size_px: int | None = None,
        pred_channel: int | None = None,
        metric_names: Sequence[str] = DEFAULT_METRIC_NAMES,
        overlay_max_side: int = 1024,
        name: str | None = None,
        cluster_link_mm: float = 5.0,
        cluster_min_count: int = 3,
        cluster_min_hit_mcs: int = 1,
        sweep_thresholds: Sequence[float] | None = None,
        froc_fp_rates: Sequence[float] = DEFAULT_FROC_FP_RATES,
        fp_per_cm2_rates: Sequence[float] = DEFAULT_FP_PER_CM2_RATES,
        curve_csv_path: str | os.PathLike | None = None,
    ) -> None:
        self.threshold = float(threshold)
        self.min_diameter_mm = float(min_diameter_mm)
        self.pred_key = pred_key
        self.label_key = label_key
        self.breast_key = breast_key
        self.image_key = image_key
        self.csv_path = csv_path
        self.overlay_dir = overlay_dir
        self.max_overlays = int(max_overlays)
        self.prefix = prefix
        self.objects_csv_path = objects_csv_path
        self.spacing_mm = None if spacing_mm is None else _spacing_pair(spacing_mm)
        self.default_spacing_mm = _spacing_pair(default_spacing_mm)
        self.max_object_size_px = max_object_size_px
        self.pred_channel = pred_channel
        self.metric_names = tuple(metric_names)
        self.overlay_max_side = int(overlay_max_side)
        self.logger = logging.getLogger(name or __name__)
        self.cluster_link_mm = float(cluster_link_mm)
        self.cluster_min_count = int(cluster_min_count)
        self.cluster_min_hit_mcs = int(cluster_min_hit_mcs)
        self.sweep = sweep_thresholds is not None
        grid = list(sweep_thresholds or []) + [self.threshold]
        self.grid = np.unique(np.asarray(grid, dtype=float))
        self._op = int(np.flatnonzero(self.grid == self.threshold)[0])
        self.froc_fp_rates = tuple(float(f) for f in froc_fp_rates)
        self.fp_per_cm2_rates = tuple(float(r) for r in fp_per_cm2_rates)
        self.curve_csv_path = curve_csv_path
        if self.sweep:
            extra = curve_metric_names(self.froc_fp_rates, self.fp_per_cm2_rates)
            self.metric_names += tuple(k for k in extra if k not in self.metric_names)
        self.rows: list[dict[str, Any]] = []
        self.object_rows: list[dict[str, Any]] = []
        self.curves: list[dict[str, Any]] = []
        self.curve: dict[str, np.ndarray] = {}
        self.summary: dict[str, float] = {}
        self._n_overlays = 0
        self._warned_spacing = False

    def attach(self, engine: Engine) -> None:
        """
        Register the handler's methods on ``engine`` (EPOCH_STARTED, ITERATION_COMPLETED, EPOCH_COMPLETED).

        Args:
            engine: an ignite engine, e.g. a MONAI ``SupervisedEvaluator``.

        """
        for event, fn in (
            (Events.EPOCH_STARTED, self.epoch_started),
            (Events.ITERATION_COMPLETED, self.iteration_completed),
            (Events.EPOCH_COMPLETED, self.epoch_completed),
        ):
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)

    def reset(self) -> None:
        """Forget the rows of the previous epoch."""
        self.rows = []
        self.object_rows = []
        self.curves = []
        self._n_overlays = 0

    def epoch_started(self, engine: Engine) -> None:
        """
        Reset the per-case rows.

        Args:
            engine: the engine the handler is attached to.

        """
        self.reset()

    def iteration_completed(self, engine: Engine) -> None:
        """
        Compute the metrics of every image of the current iteration.

        Args:
            engine: the engine the handler is attached to.

        """
        outputs = _decollate(engine.state.output) or []
        batch = _decollate(getattr(engine.state, "batch", None)) or []
        if batch and len(batch) != len(outputs):
            raise ValueError(f"engine.state.batch has {len(batch)} items but engine.state.output has {len(outputs)}.")
        for i, out in enumerate(outputs):
            b = batch[i] if batch else None
            pred = out if isinstance(out, torch.Tensor) else _get(out, self.pred_key)
            if pred is None:
                raise KeyError(f"output item has no '{self.pred_key}'.")

            def pick(key: str | None) -> Any:
                if key is None:
                    return None
                v = _get(out, key)
                return _get(b, key) if v is None else v

            keys = [k for k in (self.image_key, self.label_key, self.pred_key) if k]
            meta = _meta_of(out, keys) or _meta_of(b, keys)
            self.add_case(
                pred, pick(self.label_key), breast=pick(self.breast_key), image=pick(self.image_key), meta=meta
            )

    def _prob_2d(self, pred: Any) -> np.ndarray:
        arr = _to_numpy(pred)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3:
            ch = self.pred_channel if self.pred_channel is not None else (0 if arr.shape[0] == 1 else arr.shape[0] - 1)
            arr = arr[ch]
        return _as_2d(arr, "pred")

    def add_case(
        self,
        pred: Any,
        label: Any,
        breast: Any | None = None,
        image: Any | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """
        Compute and store the row of one image (also usable without an engine).

        Args:
            pred: probability map (C, H, W) or (H, W).
            label: truth mask (1, H, W) or (H, W).
            breast: optional breast mask.
            image: optional image, for the overlay.
            meta: optional meta data (``stem``, ``filename_or_obj``, spacing entries).

        Returns:
            the stored row.

        """
        if label is None:
            raise KeyError(f"no '{self.label_key}' found in the engine output or batch.")
        meta = dict(meta or {})
        prob = self._prob_2d(pred)
        mask = prob >= self.threshold
        truth = _as_mask(label, "label")
        if truth.shape != mask.shape:
            raise ValueError(
                f"prediction shape {mask.shape} differs from label shape {truth.shape}; "
                "restore both to the same grid before computing metrics."
            )
        breast_m = None if breast is None else _as_mask(breast, "breast")
        if breast_m is not None and breast_m.shape != mask.shape:
            self.logger.warning(f"breast mask shape {breast_m.shape} != {mask.shape}; using the whole image.")
            breast_m = None

        spacing = self.spacing_mm or _spacing_from_meta(meta, mask.shape)
        if spacing is None:
            spacing = self.default_spacing_mm
            if not self._warned_spacing:
                self.logger.warning(f"no pixel spacing in the meta data, using {spacing} mm.")
                self._warned_spacing = True

        case, filename = _case_name(meta, len(self.rows))
        names = {r["case"] for r in self.rows}
        if case in names:
            n = 1
            while f"{case}_{n}" in names:
                n += 1
            case = f"{case}_{n}"

        px = pixel_stats(mask, truth, breast_m)
        obj = object_stats(
            mask,
            truth,
            spacing,
            min_diameter_mm=self.min_diameter_mm,
            connectivity=2,
            max_size_px=self.max_object_size_px,
        )
        iou = object_iou(mask, truth, connectivity=2)
        # the operating threshold is one point of the sweep (the only one without sweep)
        curve = detection_curve(
            prob, truth, spacing, self.grid if self.sweep else [self.threshold], breast_m,
            min_diameter_mm=self.min_diameter_mm, max_size_px=self.max_object_size_px,
            link_mm=self.cluster_link_mm, min_count=self.cluster_min_count,
            min_hit_mcs=self.cluster_min_hit_mcs, connectivity=2,
        )
        op = self._op if self.sweep else 0
        n_tc, n_dc = curve["n_truth_clusters"], int(curve["detected_clusters"][op])
        row: dict[str, Any] = {
            "case": case,
            "filename": filename,
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "spacing_row_mm": spacing[0],
            "spacing_col_mm": spacing[1],
            **px,
            "n_objects": obj["n_objects"],
            "n_detected": obj["n_detected"],
            "object_detection_rate": obj["detection_rate"],
            "image_detected": obj["image_detected"],
            "n_objects_all": obj["n_objects_all"],
            "n_pred_objects": obj["n_pred_objects"],
            "n_fp_objects": obj["n_fp_objects"],
            "n_detected_all": iou["n_detected"],
            "object_iou": iou["object_iou"],
            "object_iou_detected": iou["object_iou_detected"],
            "n_pred_clusters": int(curve["pred_clusters"][op]),
            "n_fp_clusters": int(curve["fp_clusters"][op]),
            "n_truth_clusters": n_tc,
            "n_detected_clusters": n_dc,
            "cluster_sensitivity": _ratio(n_dc, n_tc),
            "breast_area_cm2": curve["breast_area_cm2"],
            "fp_marks_per_cm2": _ratio(obj["n_fp_objects"], curve["breast_area_cm2"]),
        }
        self.rows.append(row)
        self.object_rows.extend({"case": case, **o} for o in obj["objects"])
        if self.sweep:
            self.curves.append({"case": case, **curve})

        if self.overlay_dir is not None and self._n_overlays < self.max_overlays:
            img = np.zeros(mask.shape, np.float32) if image is None else _as_2d(image, "image")
            if img.shape != mask.shape:
                img = np.zeros(mask.shape, np.float32)
            overlay_png(
                img,
                mask,
                truth,
                os.path.join(os.fspath(self.overlay_dir), f"{case}_overlay.png"),
                max_side=self.overlay_max_side,
                breast=breast_m,
            )
            self._n_overlays += 1
        return row

    def compute(self) -> dict[str, float]:
        """
        Summary of the stored rows: :func:`aggregate` plus the aliases ``image_detection_rate``
        (mean of ``image_detected``), ``fp_objects_per_image`` and ``fp_marks_per_image`` (mean of
        ``n_fp_objects``) and ``fp_clusters_per_image`` (mean of ``n_fp_clusters``); with the sweep,
        the pooled curve goes to ``self.curve`` and its :func:`curve_summary` into the summary.
        """
        summary = aggregate(self.rows)
        summary["image_detection_rate"] = summary.get("image_detected", NAN)
        summary["fp_objects_per_image"] = summary.get("n_fp_objects", NAN)
        summary["fp_marks_per_image"] = summary.get("n_fp_objects", NAN)
        summary["fp_clusters_per_image"] = summary.get("n_fp_clusters", NAN)
        if self.sweep:
            self.curve = pool_detection_curves(self.curves) if self.curves else {}
            summary.update(curve_summary(self.curve, self.froc_fp_rates, self.fp_per_cm2_rates))
        return summary

    def epoch_completed(self, engine: Engine) -> None:
        """
        Put the epoch averages into ``engine.state.metrics`` and write the CSV file(s).

        Args:
            engine: the engine the handler is attached to.

        """
        self.summary = self.compute()
        for key in self.metric_names:
            engine.state.metrics[f"{self.prefix}{key}"] = float(self.summary.get(key, NAN))
        if self.csv_path is not None:
            write_csv_atomic(self.rows, self.csv_path)
        if self.objects_csv_path is not None:
            write_csv_atomic(self.object_rows, self.objects_csv_path, columns=OBJECT_COLUMNS)
        if self.sweep and self.curve_csv_path is not None:
            n = len(self.curve.get("threshold", []))
            table = [{k: float(self.curve[k][i]) for k in CURVE_COLUMNS} for i in range(n)]
            write_csv_atomic(table, self.curve_csv_path, columns=CURVE_COLUMNS)
        self.logger.info(
            f"{len(self.rows)} cases: "
            + ", ".join(f"{k}={self.summary.get(k, NAN):.4f}" for k in ("dice", "sensitivity", "activation_rate"))
        )


# ----------------------------------------------------------------------------------------------
# ignite Metric
# ----------------------------------------------------------------------------------------------
def _activation_output_transform(output: Any) -> tuple[Any, ...]:
    """Default output transform of :class:`ActivationRate`: ``(pred, label[, breast])`` lists."""
    items = output if isinstance(output, (list, tuple)) else [output]
    preds = [_get(o, "pred") for o in items]
    labels = [_get(o, "label") for o in items]
    breasts = [_get(o, "breast") for o in items]
    if all(b is not None for b in breasts):
        return preds, labels, breasts
    return preds, labels


def _split_items(x: Any) -> list[Any] | None:
    """Flatten lists of (C, H, W) items and batched (B, C, H, W) arrays into a list of items."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        items: list[Any] = []
        for e in x:
            items.extend(_split_items(e) or [])
        return items
    if getattr(x, "ndim", 0) == 4:
        return [x[i] for i in range(x.shape[0])]
    return [x]


class ActivationRate(Metric):
    """
    Mean over images of the activation rate: predicted-positive pixels inside the breast divided by
    breast pixels (``y_pred[:, channel] >= threshold``). For MONAI ``key_val_metric`` /
    ``additional_metrics``.

    ``output_transform(engine.state.output)`` must give ``(y_pred, y)`` or ``(y_pred, y, breast)``,
    each a batched tensor (B, C, H, W) or a list of (C, H, W) tensors. Without breast in it the
    breast is read from ``engine.state.batch[breast_key]`` when available, else the whole image is used.
    Images with an empty breast are skipped. ``y`` is not used (kept for the usual signature).

    Args:
        output_transform: maps the engine output to the tuple above. The default reads ``pred``,
            ``label`` and (if every item has it) ``breast`` from a list of dicts or a dict.
        threshold: probability threshold.
        channel: channel of ``y_pred`` holding the MC probability.
        breast_key: key of the breast mask in ``engine.state.batch``; None to ignore the batch.
        device: device of the accumulators.

    """

    def __init__(
        self,
        output_transform: Callable = _activation_output_transform,
        threshold: float = 0.5,
        channel: int = 0,
        breast_key: str | None = "breast",
        device: str | torch.device = "cpu",
    ) -> None:
        self.threshold = float(threshold)
        self.channel = int(channel)
        self.breast_key = breast_key
        self._batch_breasts: Any = None
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        """Clear the accumulated sum and count."""
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    def iteration_completed(self, engine: Engine) -> None:
        """
        Read the breast masks of the batch (when the output lacks them), then update.

        Args:
            engine: the engine the metric is attached to.

        """
        self._batch_breasts = None
        batch = getattr(engine.state, "batch", None)
        if self.breast_key is not None and batch is not None:
            if isinstance(batch, Mapping):
                self._batch_breasts = batch.get(self.breast_key)
            elif isinstance(batch, (list, tuple)):
                breasts = [_get(b, self.breast_key) for b in batch]
                self._batch_breasts = breasts if all(b is not None for b in breasts) else None
        try:
            super().iteration_completed(engine)
        finally:
            self._batch_breasts = None

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """
        Accumulate the activation rates of a batch.

        Args:
            output: ``(y_pred, y)`` or ``(y_pred, y, breast)``.

        """
        preds = _split_items(output[0])
        breasts = _split_items(output[2] if len(output) > 2 else self._batch_breasts)
        if breasts is not None and len(breasts) != len(preds):
            breasts = None
        for i, p in enumerate(preds):
            arr = _to_numpy(p)
            if arr.ndim == 3:
                arr = arr[self.channel]
            mask = _as_2d(arr, "y_pred") >= self.threshold
            region = np.ones_like(mask) if breasts is None else _as_mask(breasts[i], "breast")
            if region.shape != mask.shape:
                region = np.ones_like(mask)
            n = int(np.count_nonzero(region))
            if n == 0:
                continue
            self._sum += float(np.count_nonzero(mask & region)) / n
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        """Mean activation rate over the images seen (NaN when none)."""
        count = int(self._count.item())
        return float(self._sum.item()) / count if count else NAN


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------
def resolve_tracking_uri(tracking_uri: str | None = None, output_dir: str | os.PathLike | None = None) -> str:
    """
    MLflow tracking URI: ``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<output_dir>/mlruns.db`` (``output_dir`` defaults to the working directory). An
    ``http(s)`` server that does not answer within seconds is replaced by that local store, with one
    warning (see :func:`bundle.tracking.resolve_tracking_uri`, which the configs call with the
    bundle's single default store ``<bundle_root>/eval``).

    Args:
        tracking_uri: explicit URI.
        output_dir: folder of the default SQLite database.

    """
    from bundle.tracking import resolve_tracking_uri as _resolve

    return _resolve(tracking_uri, Path(output_dir if output_dir is not None else os.getcwd()))


def _mlflow_handler_on(engine: Engine, exclude: Any | None = None) -> Any | None:
    """A MONAI ``MLFlowHandler`` registered on ``engine`` (found through its bound methods) other
    than ``exclude``, or None."""
    try:
        from monai.handlers import MLFlowHandler
    except ImportError:  # pragma: no cover
        return None
    # ignite has no public listing of handlers; read its table defensively.
    table = getattr(engine, "_event_handlers", {}) or {}
    for handlers in list(table.values()):
        for entry in handlers:
            fn = entry[0] if isinstance(entry, tuple) else entry
            for _ in range(4):  # unwrap event filters / functools.wraps
                owner = getattr(fn, "__self__", None)
                if isinstance(owner, MLFlowHandler) and owner is not exclude:
                    return owner
                nxt = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
                if nxt is None:
                    break
                fn = nxt
    return None


class MLflowArtifactsHandler:
    """
    Ignite handler that, when the engine completes, logs files, folders and a configuration (as
    ``config.json``) as MLflow artifacts.

    The run is, in this order: the run of ``mlflow_handler`` when given; the run of a MONAI
    ``MLFlowHandler`` attached to the same engine (its ``cur_run``/``client``, remembered at
    STARTED/EPOCH_COMPLETED in case it is closed first); the active run of the ``mlflow`` fluent API;
    else a new run of its own in ``experiment_name`` (tracking URI from :func:`resolve_tracking_uri`),
    which is ended after logging. Attach it after the handler that writes the files (e.g.
    :class:`MCMetricsHandler`, which writes at EPOCH_COMPLETED).

    Args:
        tracking_uri: tracking URI of a run of its own; None: ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<output_dir>/mlruns.db``.
        experiment_name: experiment of a run of its own.
        run_name: name of a run of its own.
        artifacts: files and folders to log; missing ones are skipped with a warning. Folders are
            logged under their own name.
        config: a dict, or path(s) of JSON/YAML config files (merged like ``monai.bundle``), logged
            as ``config.json``.
        output_dir: folder of the default SQLite tracking database.
        artifact_path: folder inside the run's artifacts; None for the root.
        mlflow_handler: a MONAI ``MLFlowHandler`` whose run is used.
        name: logger name.

    Attributes:
        run_id: id of the run the artifacts went to, after COMPLETED.

    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "mcref",
        run_name: str | None = None,
        artifacts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        config: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        output_dir: str | os.PathLike | None = None,
        artifact_path: str | None = None,
        mlflow_handler: Any | None = None,
        name: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        if artifacts is None:
            self.artifacts: list[str] = []
        elif isinstance(artifacts, (str, os.PathLike)):
            self.artifacts = [os.fspath(artifacts)]
        else:
            self.artifacts = [os.fspath(a) for a in artifacts if a]
        self.config = config
        self.output_dir = output_dir
        self.artifact_path = artifact_path
        self.mlflow_handler = mlflow_handler
        self.logger = logging.getLogger(name or __name__)
        self.run_id: str | None = None
        self._client: Any = None
        self._monai_run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        """
        Register ``remember_run`` (STARTED, EPOCH_COMPLETED) and ``completed`` (COMPLETED) on ``engine``.

        Args:
            engine: an ignite engine.

        """
        for event in (Events.STARTED, Events.EPOCH_COMPLETED):
            if not engine.has_event_handler(self.remember_run, event):
                engine.add_event_handler(event, self.remember_run)
        if not engine.has_event_handler(self.completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def remember_run(self, engine: Engine) -> None:
        """
        Remember the run (and client) of the MONAI ``MLFlowHandler`` of ``engine``, if it has one.

        Args:
            engine: the engine the handler is attached to.

        """
        handler = self.mlflow_handler or _mlflow_handler_on(engine)
        run = getattr(handler, "cur_run", None) if handler is not None else None
        if run is not None:
            self._monai_run_id = run.info.run_id
            self._client = handler.client

    def _config_dict(self) -> dict[str, Any] | None:
        if self.config is None:
            return None
        if isinstance(self.config, Mapping):
            return dict(self.config)
        from monai.bundle import ConfigParser

        files = [self.config] if isinstance(self.config, (str, os.PathLike)) else list(self.config)
        return dict(ConfigParser.load_config_files([os.fspath(f) for f in files]))

    def _log_all(self, client: Any, run_id: str) -> None:
        for path in self.artifacts:
            if os.path.isfile(path):
                client.log_artifact(run_id, path, self.artifact_path)
            elif os.path.isdir(path):
                sub = os.path.basename(os.path.normpath(path))
                dest = sub if not self.artifact_path else f"{self.artifact_path}/{sub}"
                client.log_artifacts(run_id, path, dest)
            else:
                self.logger.warning(f"artifact {path} does not exist, not logged.")
        cfg = self._config_dict()
        if cfg is not None:
            with tempfile.TemporaryDirectory() as tmp:
                cfg_path = os.path.join(tmp, "config.json")
                with open(cfg_path, "w", encoding="utf-8") as f:
                    json.dump(cfg, f, indent=2, sort_keys=False, default=str)
                client.log_artifact(run_id, cfg_path, self.artifact_path)

    def completed(self, engine: Engine) -> None:
        """
        Log the artifacts into the chosen run.

        Args:
            engine: the engine the handler is attached to.

        """
        import mlflow

        self.remember_run(engine)
        if self._monai_run_id is not None:
            self.run_id = self._monai_run_id
            self._log_all(self._client, self.run_id)
            return
        active = mlflow.active_run()
        if active is not None:
            self.run_id = active.info.run_id
            self._log_all(mlflow.MlflowClient(), self.run_id)
            return

        uri = resolve_tracking_uri(self.tracking_uri, self.output_dir)
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").absolute().as_uri()
            exp_id = client.create_experiment(self.experiment_name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run_name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        run = client.create_run(exp_id, run_name=run_name)
        self.run_id = run.info.run_id
        status = "FINISHED"
        try:
            self._log_all(client, self.run_id)
        except Exception:
            status = "FAILED"
            raise
        finally:
            client.set_terminated(self.run_id, status)
