"""Pure per-image object, cluster and detection functions (evaluation layer, bottom).

Predicted MC objects (connected components), the highest probability inside each truth object,
cluster counts, image-level detection and the FROC; numpy in, numbers out. The ignite handlers
(:mod:`bundle.metrics`), the study (:mod:`bundle.study`) and the scripts use them; this module
imports only the geometry layer (:mod:`bundle.clusters`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from bundle.clusters import find_clusters
from bundle.utils import as_2d

__all__ = [
    "object_max_prob",
    "predicted_objects",
    "cluster_counts",
    "resolve_density_threshold",
    "image_detection",
    "froc_curve",
    "froc_summary",
]

NAN = float("nan")


def _np2d(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """``x`` as a 2-D numpy array (:func:`bundle.utils.as_2d`)."""
    return as_2d(x, name, dtype)


def _mask(x: Any, name: str) -> np.ndarray:
    arr = _np2d(x, name)
    return arr if arr.dtype == bool else arr > 0.5 if arr.dtype.kind == "f" else arr != 0


def _spacing(spacing_mm: float | Sequence[float]) -> tuple[float, float]:
    sp = np.atleast_1d(np.asarray(spacing_mm, dtype=float)).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, 2)
    if sp.size < 2 or not np.all(np.isfinite(sp[:2])) or np.any(sp[:2] <= 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm!r}")
    return float(sp[0]), float(sp[1])


def _structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(2, connectivity)


def object_max_prob(labels: np.ndarray, n: int, prob: Any) -> np.ndarray:
    """Highest probability inside each labelled object (an object is detected at ``t`` iff ``>= t``).

    Args:
        labels: (H, W) object labels 1..n (0 = background).
        n: number of objects.
        prob: (H, W) probability map.

    Returns:
        float array of length ``n``.
    """
    if n == 0:
        return np.zeros(0, dtype=float)
    p = np.nan_to_num(_np2d(prob, "prob", np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.asarray(ndimage.maximum(p, labels, index=np.arange(1, n + 1)), dtype=float).reshape(n)


def predicted_objects(
    pred: Any,
    spacing_mm: float | Sequence[float],
    breast: Any | None = None,
    min_size_px: int = 1,
    connectivity: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of a predicted mask (inside the breast), small ones removed.

    Args:
        pred: (H, W) predicted mask.
        spacing_mm: pixel spacing in mm.
        breast: optional breast mask; predicted pixels outside it are ignored.
        min_size_px: components with fewer pixels are dropped.
        connectivity: 1 or 2.

    Returns:
        ``(labels, sizes, centroids_mm)``: labels (H, W) int32 numbered 1..k after removal, sizes (k,)
        and centroids (k, 2) in mm (row, col).
    """
    p = _mask(pred, "pred")
    if breast is not None:
        p = p & _mask(breast, "breast")
    row_mm, col_mm = _spacing(spacing_mm)
    labels, n = ndimage.label(p, structure=_structure(connectivity))
    if n == 0:
        return labels.astype(np.int32), np.zeros(0, int), np.zeros((0, 2), float)
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    sizes = np.bincount(lab, minlength=n + 1)
    keep = sizes >= max(1, int(min_size_px))
    keep[0] = False
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    sr = np.bincount(lab, weights=rows, minlength=n + 1)
    sc = np.bincount(lab, weights=cols, minlength=n + 1)
    k_sizes = sizes[keep]
    cents = np.stack([sr[keep] / k_sizes * row_mm, sc[keep] / k_sizes * col_mm], axis=1)
    return remap[labels], k_sizes.astype(int), cents


def cluster_counts(
    prob: Any,
    thresholds: Sequence[float],
    truth_labels: np.ndarray,
    truth_cluster_ids: np.ndarray,
    n_truth_clusters: int,
    spacing_mm: float | Sequence[float],
    breast: Any | None = None,
    link_mm: float = 5.0,
    min_count: int = 3,
    min_hit_mcs: int = 1,
    min_pred_px: int = 1,
    connectivity: int = 2,
) -> dict[str, np.ndarray]:
    """Cluster detection counts of one image at each threshold (one FROC point per threshold).

    At threshold ``t`` the predicted MCs are the components of ``prob >= t`` in the breast (at
    least ``min_pred_px`` pixels); they are clustered like the truth (:func:`find_clusters`). A
    predicted MC *hits* a truth MC when they share a pixel. A truth cluster is detected when one
    predicted cluster hits at least ``min_hit_mcs`` of its MCs. A predicted cluster that hits no
    truth MC at all is a false-positive cluster (one that hits only truth MCs outside any truth
    cluster counts as neither).

    Args:
        prob: (H, W) probability map.
        thresholds: probability thresholds.
        truth_labels: (H, W) truth object labels 1..n.
        truth_cluster_ids: (n,) truth cluster of each truth object (-1: none).
        n_truth_clusters: number of truth clusters.
        spacing_mm: pixel spacing in mm.
        breast: optional breast mask.
        link_mm: cluster linking distance in mm.
        min_count: smallest cluster.
        min_hit_mcs: MCs of a truth cluster one predicted cluster must hit.
        min_pred_px: smallest predicted MC.
        connectivity: 1 or 2.

    Returns:
        dict of (T,) int arrays ``detected`` (truth clusters detected), ``fp`` (false-positive
        clusters), ``pred_clusters``, ``pred_objects`` and ``fp_objects`` (predicted MCs touching no
        truth pixel: false marks).
    """
    p = np.nan_to_num(_np2d(prob, "prob", np.float32), nan=0.0)
    b = None if breast is None else _mask(breast, "breast")
    tl = np.asarray(truth_labels)
    tcid = np.asarray(truth_cluster_ids, dtype=int)
    n_t = len(tcid)
    tpix = np.flatnonzero(tl.ravel())
    t_at = tl.ravel()[tpix]
    keys = ("detected", "fp", "pred_clusters", "pred_objects", "fp_objects")
    out = {k: np.zeros(len(thresholds), dtype=int) for k in keys}
    for i, t in enumerate(thresholds):
        plab, _, cents = predicted_objects(p >= t, spacing_mm, b, min_pred_px, connectivity)
        n_p = len(cents)
        out["pred_objects"][i] = n_p
        if n_p == 0:
            continue
        p_at = plab.ravel()[tpix]
        sel = p_at > 0
        out["fp_objects"][i] = int(n_p - np.unique(p_at[sel]).size)
        pcid, k = find_clusters(cents, link_mm, min_count)
        out["pred_clusters"][i] = k
        if k == 0:
            continue
        codes = np.unique(p_at[sel].astype(np.int64) * (n_t + 1) + t_at[sel])
        pp, tt = codes // (n_t + 1), codes % (n_t + 1)  # pred object (1-based), truth object (1-based)
        kk = pcid[pp - 1]
        in_cl = kk >= 0
        hit_any = np.zeros(k, dtype=bool)
        hit_any[kk[in_cl]] = True
        out["fp"][i] = int(k - hit_any.sum())
        if n_truth_clusters == 0:
            continue
        mm = tcid[tt - 1]
        ok = in_cl & (mm >= 0)
        # distinct (pred cluster, truth object) pairs, counted per (pred cluster, truth cluster)
        pair = np.unique(kk[ok].astype(np.int64) * (n_t + 1) + tt[ok])
        kc, to = pair // (n_t + 1), pair % (n_t + 1)
        key = kc * max(n_truth_clusters, 1) + tcid[to - 1]
        uk, cnt = np.unique(key, return_counts=True)
        det = np.unique(uk[cnt >= min_hit_mcs] % max(n_truth_clusters, 1))
        out["detected"][i] = int(det.size)
    return out


def resolve_density_threshold(spec: Mapping[str, Any] | float | None, values: Sequence[float]) -> float:
    """A density threshold on the raw scale from ``{"raw": v}`` or ``{"percentile": p}``.

    ``raw`` wins when it is not None; otherwise the ``p``-th percentile of the finite ``values``
    (NaN when there are none). A plain number is a raw value.

    Args:
        spec: the config entry.
        values: densities of all truth objects of the study.
    """
    if spec is None:
        return NAN
    if isinstance(spec, (int, float)):
        return float(spec)
    raw = spec.get("raw")
    if raw is not None:
        return float(raw)
    pct = spec.get("percentile")
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if pct is None or v.size == 0:
        return NAN
    return float(np.percentile(v, float(pct)))


def image_detection(
    obj_case: np.ndarray, include: np.ndarray, detected: np.ndarray, n_cases: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """Per-image detection (Fig. 6 / Table 3): 1 when an included object of the image is detected,
    0 when none is, NaN when the image has no included object (or is not ``valid``).

    Args:
        obj_case: (n_obj,) case index of each object.
        include: (n_obj,) bool, object passes the filter.
        detected: (n_obj,) bool, object detected.
        n_cases: number of images.
        valid: optional (n_cases,) bool, images evaluated for this method.

    Returns:
        (n_cases,) float array of 1/0/NaN.
    """
    oc = np.asarray(obj_case, dtype=int)
    inc = np.asarray(include, dtype=bool)
    det = np.asarray(detected, dtype=bool) & inc
    n_inc = np.bincount(oc[inc], minlength=n_cases)
    n_det = np.bincount(oc[det], minlength=n_cases)
    out = np.where(n_inc > 0, (n_det > 0).astype(float), NAN)
    if valid is not None:
        out[~np.asarray(valid, dtype=bool)] = NAN
    return out


def froc_curve(detected: np.ndarray, fp: np.ndarray, n_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled FROC points from per-image counts.

    Args:
        detected: (n_images, T) detected truth clusters per image and threshold.
        fp: (n_images, T) false-positive clusters.
        n_truth: (n_images,) truth clusters per image.

    Returns:
        ``(fp_per_image, sensitivity)``, each (T,): sum of FP clusters / number of images and sum of
        detected / sum of truth clusters (NaN without truth clusters).
    """
    d = np.asarray(detected, dtype=float)
    f = np.asarray(fp, dtype=float)
    n = np.asarray(n_truth, dtype=float)
    n_img = d.shape[0]
    tot = n.sum()
    sens = d.sum(axis=0) / tot if tot > 0 else np.full(d.shape[1], NAN)
    fpi = f.sum(axis=0) / n_img if n_img else np.full(d.shape[1], NAN)
    return fpi, sens


def froc_summary(fp_per_image: np.ndarray, sensitivity: np.ndarray, fp_rates: Sequence[float]) -> dict[str, float]:
    """Sensitivity at given false-positive rates, and their mean (the FROC score).

    The sensitivity at rate ``f`` is the highest sensitivity among the operating points with at most
    ``f`` FP clusters per image (0 when no point is that low): a step interpolation that never
    credits a method for an operating point it does not have.

    Args:
        fp_per_image: (T,) FP clusters per image of the FROC points.
        sensitivity: (T,) cluster sensitivity of the points.
        fp_rates: the rates, e.g. 0.25, 0.5, 1, 2, 4.

    Returns:
        ``{"sens_at_<f>": ..., "froc_score": mean}`` (NaN when the sensitivity is undefined).
    """
    fpi = np.asarray(fp_per_image, dtype=float)
    s = np.asarray(sensitivity, dtype=float)
    out: dict[str, float] = {}
    vals = []
    undefined = not np.any(np.isfinite(s))
    for f in fp_rates:
        ok = (fpi <= f + 1e-12) & np.isfinite(s)
        v = NAN if undefined else (float(s[ok].max()) if ok.any() else 0.0)
        out[f"sens_at_{f:g}"] = v
        vals.append(v)
    out["froc_score"] = float(np.mean(vals)) if vals and not undefined else NAN
    return out
