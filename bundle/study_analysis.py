"""The study's numbers: truth objects and every metric of one method on one image
(:func:`truth_objects`, :func:`case_statistics`), and the study-level tables, curves, confidence
intervals and paired tests over all images (:func:`summarise_study`).

Numpy in, dicts out: no files, no MLflow. The per-image metrics come from :mod:`bundle.image_metrics`
and :mod:`bundle.objects`, the swept detection curves from :mod:`bundle.detection_curves`, the tests
and intervals from :mod:`bundle.statistics`. :class:`bundle.study.MCStudy` runs the cases and calls
these; :mod:`bundle.study` re-exports them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from bundle.clusters import find_clusters
from bundle.detection_curves import curve_summary, pool_detection_curves
from bundle.image_metrics import aggregate, object_iou, object_stats, pixel_stats
from bundle.objects import (
    _mask,
    _np2d,
    _spacing,
    _structure,
    cluster_counts,
    froc_curve,
    froc_summary,
    image_detection,
    object_max_prob,
    predicted_objects,
    resolve_density_threshold,
)
from bundle.statistics import _nanmean, bootstrap_ci, bootstrap_indices, format_ci, format_p, paired_wilcoxon
from bundle.study_settings import (
    FILTERS,
    TABLE1_METRICS,
    TABLE4_METRICS,
    TABLE4_PAIRS,
    TESTED_METRICS,
    StudySettings,
    _detection_columns,
    method_label,
)

__all__ = ["truth_objects", "case_statistics", "summarise_study"]

NAN = float("nan")


def _size_key(x: int | None) -> str:
    return "all" if x is None else f"le{int(x)}"


def _size_label(x: int | None) -> str:
    return "all sizes" if x is None else f"<= {int(x)} px"


# ----------------------------------------------------------------------------------------------
# objects
# ----------------------------------------------------------------------------------------------
def truth_objects(
    truth: Any,
    spacing_mm: float | Sequence[float],
    image_raw: Any | None = None,
    ring_px: int = 3,
    connectivity: int = 2,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Truth MC objects (connected components) with size, area and densities.

    Densities follow :func:`bundle.metrics.object_stats`: ``interior_density`` is the mean of
    ``image_raw`` inside the object, ``exterior_density`` the mean over a ring of ``ring_px`` pixels
    around it (8-neighbour dilation, other truth pixels excluded). Both are NaN without ``image_raw``.

    Args:
        truth: (H, W) truth mask.
        spacing_mm: pixel spacing (row, col) in mm, or one number.
        image_raw: optional (H, W) raw image (the loaded image before normalisation).
        ring_px: ring width in pixels.
        connectivity: 1 or 2.

    Returns:
        ``(labels, objects)``: ``labels`` (H, W) int32 with object ``i`` labelled ``i`` (1-based), and
        one dict per object with ``object_id``, ``size_px``, ``area_mm2``, ``diameter_mm``,
        ``centroid_row``, ``centroid_col`` (pixels), ``interior_density``, ``exterior_density``.
    """
    t = _mask(truth, "truth")
    row_mm, col_mm = _spacing(spacing_mm)
    labels, n = ndimage.label(t, structure=_structure(connectivity))
    st = object_stats(
        np.zeros_like(t), t, (row_mm, col_mm), connectivity=connectivity, image=image_raw, ring_px=int(ring_px)
    )
    objects = []
    for o in st["objects"]:
        objects.append(
            {
                "object_id": int(o["object_id"]),
                "size_px": int(o["size_px"]),
                "area_mm2": float(o["size_px"] * row_mm * col_mm),
                "diameter_mm": float(o["diameter_mm"]),
                "centroid_row": float(o["centroid_row"]),
                "centroid_col": float(o["centroid_col"]),
                "interior_density": float(o.get("interior_density", NAN)),
                "exterior_density": float(o.get("exterior_density", NAN)),
            }
        )
    if len(objects) != n:  # pragma: no cover - both label the same mask with the same structure
        raise RuntimeError("object labelling is inconsistent")
    return labels.astype(np.int32), objects


# ----------------------------------------------------------------------------------------------
# one case, one method
# ----------------------------------------------------------------------------------------------
def case_statistics(
    prob: Any,
    truth: Any,
    breast: Any | None,
    spacing_mm: float | Sequence[float],
    settings: StudySettings,
    method: str = "",
    truth_labels: np.ndarray | None = None,
    truth_objs: Sequence[Mapping[str, Any]] | None = None,
    truth_cluster_ids: np.ndarray | None = None,
    n_truth_clusters: int | None = None,
) -> dict[str, Any]:
    """All numbers of one method on one image.

    Args:
        prob: (H, W) probability map of the method.
        truth: (H, W) truth mask.
        breast: (H, W) breast mask or None (whole image).
        spacing_mm: pixel spacing in mm.
        settings: the study settings.
        method: method name (picks its threshold and FROC grid).
        truth_labels: precomputed truth labels (see :func:`truth_objects`); computed when None.
        truth_objs: precomputed truth objects (needs ``truth_labels``).
        truth_cluster_ids: precomputed truth cluster ids per object.
        n_truth_clusters: precomputed number of truth clusters.

    Returns:
        ``{"row": per-image metrics at the operating threshold, "max_prob": (n_objects,) array,
        "froc": {"thresholds", "detected", "fp", "pred_clusters", "pred_objects", "fp_objects",
        "n_truth_clusters"}, "curve": the sweep in the form of bundle.metrics.detection_curve}``.
        The row has :func:`bundle.metrics.pixel_stats` plus ``n_objects``, ``n_detected``,
        ``object_detection_rate``, ``image_detected`` (NaN without truth objects), ``n_pred_objects``,
        ``n_fp_objects`` (predicted objects touching no truth pixel: false marks), ``false_alarm``
        (1/0 on images without truth objects, NaN otherwise), ``n_truth_clusters``,
        ``n_detected_clusters``, ``n_fp_clusters``, ``n_objects_all``, ``n_detected_all``,
        ``object_iou``, ``object_iou_detected`` (:func:`bundle.metrics.object_iou` of the whole
        predicted mask), ``breast_area_cm2``, ``fp_marks_per_cm2``, ``threshold``. The sweep's object
        TPR counts objects of at least ``settings.tpr_min_diameter_mm`` (and ``min_object_px``).
    """
    thr = settings.threshold_for(method)
    p = np.nan_to_num(_np2d(prob, "prob", np.float32), nan=0.0)
    t = _mask(truth, "truth")
    b = None if breast is None else _mask(breast, "breast")
    if truth_labels is None or truth_objs is None:
        truth_labels, truth_objs = truth_objects(t, spacing_mm, None, settings.ring_px, settings.connectivity)
    n_all = len(truth_objs)
    if truth_cluster_ids is None or n_truth_clusters is None:
        row_mm, col_mm = _spacing(spacing_mm)
        cents = np.array([[o["centroid_row"] * row_mm, o["centroid_col"] * col_mm] for o in truth_objs]).reshape(-1, 2)
        truth_cluster_ids, n_truth_clusters = find_clusters(cents, settings.cluster_link_mm, settings.cluster_min_count)
    pred = p >= thr
    row: dict[str, Any] = dict(pixel_stats(pred, t, b))
    maxp = object_max_prob(truth_labels, n_all, p)
    sizes = np.array([o["size_px"] for o in truth_objs], dtype=int)
    incl = sizes >= settings.min_object_px
    det = (maxp >= thr) & incl
    n_inc = int(incl.sum())
    row["n_objects"] = n_inc
    row["n_detected"] = int(det.sum())
    row["object_detection_rate"] = row["n_detected"] / n_inc if n_inc else NAN
    row["image_detected"] = (1.0 if det.any() else 0.0) if n_inc else NAN
    plab, psizes, _ = predicted_objects(pred, spacing_mm, b, settings.pred_min_object_px, settings.connectivity)
    row["n_pred_objects"] = int(len(psizes))
    touching = np.unique(plab[t & (plab > 0)])
    row["n_fp_objects"] = int(len(psizes) - touching.size)
    grid = settings.froc_grid(method)
    cc = cluster_counts(
        p, grid, truth_labels, truth_cluster_ids, int(n_truth_clusters), spacing_mm, b,
        settings.cluster_link_mm, settings.cluster_min_count, settings.cluster_min_hit_mcs,
        settings.pred_min_object_px, settings.connectivity,
    )
    op = int(np.argmin(np.abs(grid - thr)))
    if n_inc == 0:
        if settings.false_alarm_unit == "cluster":
            row["false_alarm"] = float(cc["pred_clusters"][op] > 0)
        else:
            row["false_alarm"] = float(np.any(psizes >= settings.false_alarm_min_px))
    else:
        row["false_alarm"] = NAN
    row["n_truth_clusters"] = int(n_truth_clusters)
    row["n_detected_clusters"] = int(cc["detected"][op])
    row["n_fp_clusters"] = int(cc["fp"][op])
    iou = object_iou(pred, t, settings.connectivity)
    row["n_objects_all"] = int(n_all)
    row["n_detected_all"] = iou["n_detected"]
    row["object_iou"] = iou["object_iou"]
    row["object_iou_detected"] = iou["object_iou_detected"]
    row_mm, col_mm = _spacing(spacing_mm)
    area = float(np.count_nonzero(b) if b is not None else t.size) * row_mm * col_mm / 100.0
    row["breast_area_cm2"] = area
    row["fp_marks_per_cm2"] = row["n_fp_objects"] / area if area > 0 else NAN
    row["threshold"] = thr
    froc = {"thresholds": grid, "n_truth_clusters": int(n_truth_clusters), **cc}
    diam = np.array([o["diameter_mm"] for o in truth_objs], dtype=float)
    tpr_incl = incl & (diam >= settings.tpr_min_diameter_mm * (1.0 - 1e-9))
    curve = {
        "thresholds": grid, "n_objects": int(tpr_incl.sum()), "n_truth_clusters": int(n_truth_clusters),
        "breast_area_cm2": area, "detected_objects": (maxp[tpr_incl][None, :] >= grid[:, None]).sum(axis=1),
        "fp_marks": cc["fp_objects"], "pred_marks": cc["pred_objects"], "detected_clusters": cc["detected"],
        "fp_clusters": cc["fp"], "pred_clusters": cc["pred_clusters"],
    }
    return {"row": row, "max_prob": maxp, "froc": froc, "curve": curve}


# ----------------------------------------------------------------------------------------------
# study-level aggregation
# ----------------------------------------------------------------------------------------------
def summarise_study(
    settings: StudySettings,
    reference_method: str,
    table2_methods: Sequence[str],
    methods: list[str],
    skipped: dict[str, str],
    cases: list[dict[str, Any]],
    failed: list[dict[str, str]],
    rows: dict[str, list[dict[str, Any]]],
    objects: list[dict[str, Any]],
    maxprob: dict[str, list[float]],
    froc: dict[str, dict[str, list[Any]]],
    grids: dict[str, np.ndarray],
    panels: dict[str, dict[str, str]],
    seg_reason: str,
    inp_reason: str,
) -> dict[str, Any]:
    """All study-level numbers from the per-case results of :meth:`bundle.study.MCStudy.run`:
    Tables 1-4 (means with bootstrap CIs over images, paired Wilcoxon p-values), the Fig. 6 curves,
    the cluster FROC and its summary, the detection metrics and the per-object rows.

    Args:
        settings: the study settings.
        reference_method: the method Tables 1 and 3 test against (ignored when it did not run).
        table2_methods: the two methods of Table 2.
        methods: the methods that ran, in order.
        skipped: method -> why it was skipped.
        cases: one dict per prepared case (``case``, ``has_mcs``, ``n_clusters``...).
        failed: one dict per failure (``case``, ``method``, ``error``).
        rows: method -> per-case rows (:func:`case_statistics` ``row`` plus ``case``, ``seconds``).
        objects: one dict per truth object of all cases (with ``case_index``).
        maxprob: method -> highest probability inside each object (NaN where the method failed).
        froc: method -> ``detected``/``fp`` per case (over that method's grid), ``case`` indices and
            ``curves`` (the sweeps of :func:`case_statistics`).
        grids: method -> FROC thresholds.
        panels: method -> case -> panel PNG.
        seg_reason: why SegAI was not loaded ("" when it was).
        inp_reason: why the inpainter was not loaded.

    Returns:
        the result dictionary of the study (``methods``, ``metrics``, ``pvalues``, ``table1``...);
        :class:`bundle.study.MCStudy` adds ``files``, ``markdown`` and ``mlflow_runs``.
    """
    s = settings
    n = len(cases)
    idx = bootstrap_indices(n, s.bootstrap_resamples, s.seed)
    names = [c["case"] for c in cases]
    pos = {nm: i for i, nm in enumerate(names)}
    has_mcs = np.array([c["has_mcs"] for c in cases], dtype=bool)

    def per_case(m: str, key: str) -> np.ndarray:
        v = np.full(n, NAN)
        for r in rows[m]:
            val = r.get(key)
            v[pos[r["case"]]] = float(val) if val is not None else NAN
        return v

    valid = {m: ~np.isnan(per_case(m, "dice")) for m in methods}

    # objects: method-independent columns, plus each method's max prob and detection
    obj_case = np.array([o["case_index"] for o in objects], dtype=int)
    size = np.array([o["size_px"] for o in objects], dtype=float)
    ext = np.array([o["exterior_density"] for o in objects], dtype=float)
    inn = np.array([o["interior_density"] for o in objects], dtype=float)
    base_incl = size >= s.min_object_px
    ext_thr = resolve_density_threshold(s.exterior_density_min, ext[base_incl])
    int_thr = resolve_density_threshold(s.interior_density_max, inn[base_incl])
    filt = {
        "a": base_incl,
        "b": base_incl & (ext >= ext_thr) if np.isfinite(ext_thr) else np.zeros_like(base_incl),
        "c": base_incl & (inn <= int_thr) if np.isfinite(int_thr) else np.zeros_like(base_incl),
    }
    det_obj = {m: np.asarray(maxprob[m], dtype=float) >= s.threshold_for(m) for m in methods}

    def size_mask(x: int | None) -> np.ndarray:
        return np.ones_like(base_incl) if x is None else size <= x

    # Table 1 (+ CIs, p-values vs reference)
    ref = reference_method if reference_method in methods else None
    table1: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] = {m: {} for m in methods}
    pvals: dict[str, dict[str, float]] = {m: {} for m in methods}
    for m in methods:
        for k in TABLE1_METRICS:
            v = per_case(m, k)
            mean = float(_nanmean(v)) if np.any(np.isfinite(v)) else NAN
            lo, hi = bootstrap_ci(v, indices=idx, confidence=s.confidence)
            metrics[m].update({k: mean, f"{k}_ci_lo": lo, f"{k}_ci_hi": hi})
        if ref is not None and m != ref:
            for k in TESTED_METRICS:
                pvals[m][k] = paired_wilcoxon(per_case(m, k), per_case(ref, k))["p_value"]
        # image level
        spec_v = np.where(~has_mcs & valid[m], 1.0 - per_case(m, "false_alarm"), NAN)
        lo, hi = bootstrap_ci(spec_v, indices=idx, confidence=s.confidence)
        metrics[m].update({"image_specificity": float(_nanmean(spec_v)) if np.any(np.isfinite(spec_v)) else NAN,
                           "image_specificity_ci_lo": lo, "image_specificity_ci_hi": hi,
                           "n_normal_images": float(np.sum(np.isfinite(spec_v)))})
        secs = per_case(m, "seconds")
        metrics[m]["seconds_per_case"] = float(_nanmean(secs)) if np.any(np.isfinite(secs)) else NAN
        metrics[m]["n_cases"] = float(valid[m].sum())
    for m in methods:
        r = {"method": method_label(m), "n": int(metrics[m]["n_cases"])}
        for k in TABLE1_METRICS:
            scale, dig = (100.0, 2) if "activation" in k else (100.0, 1)
            r[k] = format_ci(metrics[m][k], metrics[m][f"{k}_ci_lo"], metrics[m][f"{k}_ci_hi"], scale, dig)
            if k in TESTED_METRICS:
                r[f"p_{k}"] = "ref" if m == ref else format_p(pvals[m].get(k, NAN))
        table1.append(r)

    # Table 4: class-balanced metrics (MC-GenRef's columns), p vs each method's own baseline
    table4: list[dict[str, Any]] = []
    base_of = {a: b for a, b in TABLE4_PAIRS if a in methods and b in methods}
    for m in methods:
        r = {"method": method_label(m), "n": int(metrics[m]["n_cases"])}
        for k in TABLE4_METRICS:
            if k not in metrics[m]:
                v = per_case(m, k)
                lo, hi = bootstrap_ci(v, indices=idx, confidence=s.confidence)
                metrics[m].update({k: float(_nanmean(v)) if np.any(np.isfinite(v)) else NAN, f"{k}_ci_lo": lo, f"{k}_ci_hi": hi})
            r[k] = format_ci(metrics[m][k], metrics[m][f"{k}_ci_lo"], metrics[m][f"{k}_ci_hi"], 100.0, 1)
            b = base_of.get(m)
            r[f"p_{k}"] = format_p(paired_wilcoxon(per_case(m, k), per_case(b, k))["p_value"]) if b else ""
        r["vs"] = method_label(base_of[m]) if m in base_of else ""
        table4.append(r)

    # Table 2: with vs without the SegAI mask
    table2: list[dict[str, Any]] = []
    t2 = [m for m in table2_methods if m in methods]
    p2: dict[str, float] = {}
    if len(t2) == 2:
        for k in TESTED_METRICS:
            p2[k] = paired_wilcoxon(per_case(t2[1], k), per_case(t2[0], k))["p_value"]
    for j, m in enumerate(t2):
        r = {"method": method_label(m), "n": int(metrics[m]["n_cases"])}
        for k in TABLE1_METRICS:
            scale, dig = (100.0, 2) if "activation" in k else (100.0, 1)
            r[k] = format_ci(metrics[m][k], metrics[m][f"{k}_ci_lo"], metrics[m][f"{k}_ci_hi"], scale, dig)
            if k in TESTED_METRICS:
                r[f"p_{k}"] = "ref" if j == 0 else format_p(p2.get(k, NAN))
        table2.append(r)

    # Fig. 6 curves and Table 3 (image level by size/density)
    vec_cache: dict[tuple[str, str, int | None], np.ndarray] = {}

    def img_vec(f: str, m: str, x: int | None) -> np.ndarray:
        key = (f, m, x)
        if key not in vec_cache:
            vec_cache[key] = image_detection(obj_case, filt[f] & size_mask(x), det_obj[m], n, valid[m])
        return vec_cache[key]

    curves: dict[str, dict[str, dict[str, list[float]]]] = {f: {} for f in FILTERS}
    curve_rows: list[dict[str, Any]] = []
    table3: dict[str, list[dict[str, Any]]] = {f: [] for f in FILTERS}
    for f in FILTERS:
        for m in methods:
            ys, los, his, ns, objrate = [], [], [], [], []
            for x in s.size_thresholds_px:
                inc = filt[f] & size_mask(x)
                v = img_vec(f, m, x)
                y = float(_nanmean(v)) if np.any(np.isfinite(v)) else NAN
                lo, hi = bootstrap_ci(v, indices=idx, confidence=s.confidence)
                oinc = inc & np.isin(obj_case, np.flatnonzero(valid[m]))
                orate = float(det_obj[m][oinc].mean()) if oinc.any() else NAN
                pv = paired_wilcoxon(v, img_vec(f, ref, x))["p_value"] if ref is not None and m != ref else NAN
                ys.append(y), los.append(lo), his.append(hi), ns.append(int(np.sum(np.isfinite(v)))), objrate.append(orate)
                curve_rows.append({"filter": f, "method": m, "max_size_px": "all" if x is None else int(x),
                                   "n_images": ns[-1], "image_detection_rate": y, "ci_lo": lo, "ci_hi": hi,
                                   "p_vs_ref": pv, "n_objects": int(oinc.sum()), "object_detection_rate": orate})
            curves[f][m] = {"y": ys, "lo": los, "hi": his, "n": ns, "object_rate": objrate}
        for x in s.table3_sizes_px:
            r = {"objects": _size_label(x)}
            for m in methods:
                v = img_vec(f, m, x)
                y = float(_nanmean(v)) if np.any(np.isfinite(v)) else NAN
                lo, hi = bootstrap_ci(v, indices=idx, confidence=s.confidence)
                r["n_images"] = int(np.sum(np.isfinite(v)))
                cell = format_ci(y, lo, hi)
                key = f"image_detection_{f}_{_size_key(x)}"
                if ref is not None and m != ref:
                    pv = paired_wilcoxon(v, img_vec(f, ref, x))["p_value"]
                    pvals[m][key] = pv
                    cell += f" (p {format_p(pv)})"
                r[method_label(m)] = cell
                metrics[m][key] = y
                metrics[m][f"{key}_ci_lo"] = lo
                metrics[m][f"{key}_ci_hi"] = hi
            table3[f].append(r)
    spec_row = {"objects": "specificity (images without MCs)", "n_images": int(np.sum(~has_mcs))}
    for m in methods:
        spec_row[method_label(m)] = format_ci(
            metrics[m]["image_specificity"], metrics[m]["image_specificity_ci_lo"], metrics[m]["image_specificity_ci_hi"]
        )

    # FROC
    froc_rows: list[dict[str, Any]] = []
    froc_points: list[dict[str, Any]] = []
    detection_rows: list[dict[str, Any]] = []
    froc_plot: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    n_truth_all = np.array([c["n_clusters"] for c in cases], dtype=float)
    for m in methods:
        g = grids[m]
        if froc[m]["case"]:
            D = np.array(froc[m]["detected"], dtype=float)
            F = np.array(froc[m]["fp"], dtype=float)
            ci_rows = np.array(froc[m]["case"], dtype=int)
        else:
            D = F = np.zeros((0, len(g)))
            ci_rows = np.zeros(0, int)
        NT = n_truth_all[ci_rows]
        fpi, sens = froc_curve(D, F, NT)
        summ = froc_summary(fpi, sens, s.froc_fp_rates)
        op = int(np.argmin(np.abs(g - s.threshold_for(m))))
        # bootstrap over the method's images (resample rows)
        nr = len(ci_rows)
        fidx = bootstrap_indices(nr, s.bootstrap_resamples, s.seed)

        def score(ix: np.ndarray, D: np.ndarray = D, F: np.ndarray = F, NT: np.ndarray = NT) -> float:
            a, b_ = froc_curve(D[ix], F[ix], NT[ix])
            return froc_summary(a, b_, s.froc_fp_rates)["froc_score"]

        lo, hi = bootstrap_ci(statistic=score, n=nr, indices=fidx, confidence=s.confidence) if nr else (NAN, NAN)
        metrics[m].update({"froc_score": summ["froc_score"], "froc_score_ci_lo": lo, "froc_score_ci_hi": hi})
        for f_ in s.froc_fp_rates:
            metrics[m][f"froc_sens_at_{f_:g}"] = summ[f"sens_at_{f_:g}"]
        metrics[m]["cluster_sensitivity"] = float(sens[op]) if len(sens) else NAN
        metrics[m]["fp_clusters_per_image"] = float(fpi[op]) if len(fpi) else NAN
        froc_plot[m] = (fpi, sens, op)
        fr = {"method": method_label(m), "froc_score": format_ci(summ["froc_score"], lo, hi)}
        for f_ in s.froc_fp_rates:
            fr[f"sens@{f_:g}"] = format_ci(summ[f"sens_at_{f_:g}"], NAN, NAN)
        fr["op_sensitivity"] = format_ci(metrics[m]["cluster_sensitivity"], NAN, NAN)
        fpo = metrics[m]["fp_clusters_per_image"]
        fr["op_fp_per_image"] = f"{fpo:.2f}" if np.isfinite(fpo) else "n/a"
        froc_rows.append(fr)
        # reader-facing detection metrics (bundle.metrics): false marks, IoU, TPR at FP/cm^2
        pooled = pool_detection_curves(froc[m]["curves"]) if froc[m]["curves"] else {}
        cs = curve_summary(pooled, s.froc_fp_rates, s.fp_per_cm2_rates)
        agg = aggregate(rows[m])
        fpm, fpc = per_case(m, "n_fp_objects"), per_case(m, "n_fp_clusters")
        normal = ~has_mcs & valid[m]
        rd = {
            "fp_marks_per_image": float(_nanmean(fpm)) if np.any(np.isfinite(fpm)) else NAN,
            "fp_marks_per_normal_image": float(_nanmean(fpm[normal])) if normal.any() else NAN,
            "fp_clusters_per_normal_image": float(_nanmean(fpc[normal])) if normal.any() else NAN,
            "object_iou": agg.get("object_iou_pooled", NAN),
            "object_iou_detected": agg.get("object_iou_detected_pooled", NAN),
            "fp_marks_per_cm2": float(pooled["fp_marks_per_cm2"][op]) if pooled else NAN,
            "object_tpr": float(pooled["object_tpr"][op]) if pooled else NAN,
        }
        for r_ in s.fp_per_cm2_rates:
            key = f"tpr_at_{r_:g}_fp_per_cm2"
            rd[key] = cs[key]
        metrics[m].update(rd)
        detection_rows.append({"method": method_label(m), "n_normal": int(normal.sum()), **{
            k: metrics[m].get(k, NAN) for k in _detection_columns(s)}})
        extra = {k: pooled[k] for k in ("fp_marks_per_image", "fp_marks_per_cm2", "object_tpr")} if pooled else {}
        for i, (t, a, b_) in enumerate(zip(g, fpi, sens)):
            froc_points.append({"method": m, "threshold": float(t), "fp_clusters_per_image": float(a),
                                "cluster_sensitivity": float(b_),
                                **{k: float(v[i]) for k, v in extra.items()}})

    # per-object rows per method
    obj_rows: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        mp = np.asarray(maxprob[m], dtype=float)
        obj_rows[m] = [
            {**{k: v for k, v in o.items() if k != "case_index"}, "max_prob": float(mp[i]),
             "detected": bool(det_obj[m][i]) if np.isfinite(mp[i]) else None}
            for i, o in enumerate(objects)
        ]

    return {
        "methods": methods,
        "skipped": skipped,
        "segai_reason": seg_reason,
        "inpainter_reason": inp_reason,
        "cases": cases,
        "failed": failed,
        "rows": rows,
        "objects": objects,
        "object_rows": obj_rows,
        "metrics": metrics,
        "pvalues": pvals,
        "reference": ref,
        "table1": table1,
        "table2": table2,
        "table4": table4,
        "table2_methods": t2,
        "table3": table3,
        "specificity_row": spec_row,
        "curves": curves,
        "curve_rows": curve_rows,
        "froc_rows": froc_rows,
        "froc_points": froc_points,
        "detection_rows": detection_rows,
        "froc_plot": froc_plot,
        "density_thresholds": {"exterior_min": ext_thr, "interior_max": int_thr},
        "panels": panels,
        "n_cases": n,
        "n_with_mcs": int(has_mcs.sum()),
        "n_objects": int(base_incl.sum()),
        "n_truth_clusters": int(n_truth_all.sum()),
    }
