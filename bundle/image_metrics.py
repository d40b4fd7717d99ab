"""Pure per-image microcalcification (MC) metrics: numpy in, python values out.

- :func:`pixel_stats`: pixel-level confusion counts, Dice, sensitivity (recall), PPV, activation
  rate, true activation rate, FNR, specificity, balanced accuracy, G-mean.
- :func:`object_stats`: truth MC objects (connected components), their equivalent diameter, whether
  any predicted-positive pixel touches them, and predicted components touching no truth object.
- :func:`aggregate`: mean over cases ignoring NaN, plus pooled object detection rate and pooled Dice
  (and pooled cluster sensitivity, object IoU and false marks per cm^2 when the rows have them).
- :func:`object_iou`: IoU of each truth MC object with the predicted components overlapping it
  (HDoGReg's object IoU), mean over all truth objects and over the detected ones.
- :func:`truth_clusters`, :func:`cluster_stats`: MC clusters (>= 3 marks, single linkage 5 mm) of the
  truth and the prediction; detected truth clusters and false-positive clusters of one image.
- :func:`loss_stages`: for each truth MC a two-stage pipeline misses, the stage that lost it (SegAI,
  its candidate threshold, the hole's false-alarm control, the refined threshold, the size limit).
- :func:`local_contrast_to_noise`: an MC's local contrast against the image's own noise, to tell an
  MC no detector could separate from the tissue from one a model misses.

The threshold sweeps built on them are in :mod:`bundle.detection_curves`, the ignite handlers that
report them in :mod:`bundle.metric_handlers`; :mod:`bundle.metrics` re-exports all three.
Definitions follow the supplement of the generative-refinement paper (section E, see
``docs/metrics.md``). The confusion counts are a few numpy reductions on boolean masks, kept here
rather than taken from ``monai.metrics`` (``DiceMetric``, ``ConfusionMatrixMetric``) because those
work on batched one-hot tensors, count the whole image for specificity and give no per-object or
per-cluster numbers, while these definitions count the true negatives inside the breast only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from bundle.clusters import find_clusters, mark_table
from bundle.objects import cluster_counts
from bundle.utils import as_2d

__all__ = [
    "pixel_stats",
    "object_stats",
    "aggregate",
    "object_iou",
    "truth_clusters",
    "cluster_stats",
    "local_contrast_to_noise",
    "loss_stages",
    "LOSS_STAGES",
]

NAN = float("nan")


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
# reader-facing detection metrics: false marks, clusters, object IoU
# ----------------------------------------------------------------------------------------------


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
    cc = cluster_counts(
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


#: the stages of :func:`loss_stages`, in pipeline order ("found" first).
LOSS_STAGES: tuple[str, ...] = ("found", "segai_mask", "candidates", "hole_control", "refined", "size_limit")


def loss_stages(
    truth: Any,
    final: Any,
    prob: Any,
    hole: Any,
    refined_prob: Any,
    threshold: float = 0.05,
    candidate_threshold: float = 0.2,
    refined_threshold: float = 0.6,
    spacing_mm: float | Sequence[float] = 0.07,
    min_diameter_mm: float = 0.2,
    connectivity: int = 2,
) -> dict[str, int]:
    """Where a two-stage pipeline (SegAI, hole control, refinement) loses each truth MC.

    Each included truth object (equivalent diameter ``>= min_diameter_mm``) is counted once, at
    the first stage that drops it: ``found`` (a pixel of ``final`` touches it), ``segai_mask``
    (SegAI's probability stays below ``threshold`` on all its pixels), ``candidates`` (below the
    hole control's ``candidate_threshold``), ``hole_control`` (no pixel in the ``hole`` the
    control kept), ``refined`` (the refined probability stays below ``refined_threshold``) and
    ``size_limit`` (refined mask touches it, the final mask does not: its mark was removed as too
    large). An MC lost at ``segai_mask`` needs a different SegAI; the later stages are operating
    points (candidate threshold, control, refined threshold, size limit) that a sweep can move.

    Args:
        truth: (H, W) truth mask.
        final: (H, W) final (refined) mask.
        prob: (H, W) SegAI probability.
        hole: (H, W) mask of the hole the refiner saw (the control's kept marks).
        refined_prob: (H, W) refined probability.
        threshold: SegAI's mask threshold.
        candidate_threshold: the hole control's lowest candidate probability.
        refined_threshold: the refined mask's threshold.
        spacing_mm: pixel spacing in mm (float or (row, col)).
        min_diameter_mm: smallest included object.
        connectivity: 1 (4-connectivity) or 2 (8-connectivity) of the truth objects.

    Returns:
        ``{stage: number of included objects}`` over :data:`LOSS_STAGES`.
    """
    t = _as_mask(truth, "truth")
    arrays = {"final": _as_mask(final, "final"), "hole": _as_mask(hole, "hole"),
              "prob": _as_2d(prob, "prob").astype(np.float32), "refined_prob": _as_2d(refined_prob, "refined_prob")}
    for name, a in arrays.items():
        if a.shape != t.shape:
            raise ValueError(f"{name} shape {a.shape} differs from truth shape {t.shape}.")
    labels, n = ndimage.label(t, structure=ndimage.generate_binary_structure(2, connectivity))
    counts = dict.fromkeys(LOSS_STAGES, 0)
    if n == 0:
        return counts
    idx = np.arange(1, n + 1)
    row_mm, col_mm = _spacing_pair(spacing_mm)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    included = 2.0 * np.sqrt(sizes * row_mm * col_mm / math.pi) >= min_diameter_mm * (1.0 - 1e-9)
    found = ndimage.maximum(arrays["final"].astype(np.uint8), labels, idx) > 0
    pmax = ndimage.maximum(arrays["prob"], labels, idx)
    in_hole = ndimage.maximum(arrays["hole"].astype(np.uint8), labels, idx) > 0
    rmax = ndimage.maximum(np.where(arrays["hole"], arrays["refined_prob"], 0.0), labels, idx)
    stage = np.select(
        [found, pmax < threshold, pmax < candidate_threshold, ~in_hole, rmax < refined_threshold],
        list(LOSS_STAGES[:5]), default=LOSS_STAGES[5],
    )
    for s in stage[included]:
        counts[str(s)] += 1
    return counts


def local_contrast_to_noise(image: Any, radius_px: int = 4, noise_sigma_px: float = 2.0, window_px: int = 25) -> np.ndarray:
    """Local contrast-to-noise map of small bright spots.

    The contrast is the white top-hat of ``image`` with a disk of ``radius_px`` (what stands above
    the tissue around a spot no wider than the disk); the noise is the local RMS of the image's
    high-pass residual (``image`` minus its Gaussian blur at ``noise_sigma_px``) over a
    ``window_px`` square. Both are library calls (``skimage.morphology.white_tophat``,
    ``scipy.ndimage``); the composition is kept here because the evaluation needs one fixed
    definition to compare found and missed MCs with the tissue's own spots (docs/results.md).

    Args:
        image: (H, W) image, normalised or raw.
        radius_px: radius of the top-hat's disk in pixels.
        noise_sigma_px: sigma of the blur whose residual is the noise.
        window_px: side of the square window of the local RMS.

    Returns:
        float32 (H, W) map, contrast / noise (0 where the noise is 0).
    """
    from skimage.morphology import disk, white_tophat

    x = _as_2d(image, "image").astype(np.float32)
    if radius_px < 1 or window_px < 1 or noise_sigma_px <= 0:
        raise ValueError(f"radius_px and window_px must be >= 1 and noise_sigma_px > 0, got {radius_px}, {window_px}, {noise_sigma_px}")
    contrast = white_tophat(x, footprint=disk(int(radius_px)))
    residual = x - ndimage.gaussian_filter(x, float(noise_sigma_px))
    noise = np.sqrt(np.maximum(ndimage.uniform_filter(residual * residual, size=int(window_px)), 0.0))
    out = np.zeros_like(x)
    np.divide(contrast, noise, out=out, where=noise > 0)
    return out.astype(np.float32)
