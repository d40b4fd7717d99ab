"""Detection counts swept over probability thresholds: the cluster FROC and the object TPR at
given false marks per cm^2 of breast (``docs/metrics.md``, "Detection metrics").

- :func:`detection_curve`: the counts of :func:`bundle.image_metrics.cluster_stats` and
  :func:`bundle.image_metrics.object_stats` of one image at every threshold of a sweep.
- :func:`pool_detection_curves`: the per-image sweeps pooled into the study-level curves.
- :func:`interpolate_tpr`, :func:`curve_summary`, :func:`curve_metric_names`: the pooled curves
  summarised at given rates (``froc_score``, ``froc_sens_at_<f>``, ``tpr_at_<r>_fp_per_cm2``).

The FROC itself is :func:`bundle.objects.froc_curve` / :func:`bundle.objects.froc_summary`, shared
with the study. :func:`interpolate_tpr` is ``numpy.interp`` on the running-maximum operating
points; no library offers the read-out at a false-positive rate with the (0, 0) point added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from bundle.image_metrics import NAN, _as_2d, _as_mask, _spacing_pair, _to_numpy, truth_clusters
from bundle.objects import cluster_counts, froc_curve, froc_summary

__all__ = [
    "DEFAULT_SWEEP_THRESHOLDS",
    "DEFAULT_FROC_FP_RATES",
    "DEFAULT_FP_PER_CM2_RATES",
    "CURVE_COLUMNS",
    "detection_curve",
    "pool_detection_curves",
    "interpolate_tpr",
    "curve_metric_names",
    "curve_summary",
]


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


def _area_cm2(n_px: int, spacing: tuple[float, float]) -> float:
    return float(n_px) * spacing[0] * spacing[1] / 100.0


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
    cc = cluster_counts(p, thr, labels, ids, n_tc, spacing, None, link_mm, min_count, min_hit_mcs, 1, connectivity)

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
