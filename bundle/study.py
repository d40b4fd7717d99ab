"""Study-level evaluation of microcalcification (MC) methods: objects, patients, clusters, statistics.

One :class:`MCStudy` run (``configs/evaluate_study.json``) takes a labelled data set, runs SegAI once
per case, applies every chosen refinement method (``bundle.refine``) to that SegAI map and computes,
case by case (streaming: whole-image arrays are dropped once a case's numbers are computed):

- pixel metrics (seed Table 1: sensitivity, PPV, Dice, activation rate, true activation rate);
- truth MC objects (connected components) with size (pixels, mm^2), interior density (mean raw
  value inside) and exterior density (mean raw value of a ring around it), and the highest
  probability inside each object (an object is detected at threshold ``t`` when that value is
  ``>= t``, i.e. when a predicted-positive pixel falls inside it);
- image (patient) level detection by object size and density (seed Fig. 6, Table 3) and image
  level specificity on images without MCs;
- MC clusters (single linkage of MC centroids, at least ``min_count`` MCs) for truth and prediction,
  and the cluster FROC swept over the probability threshold;
- the reader-facing detection metrics of :mod:`bundle.metrics`: false marks and false-positive
  clusters per image (also on the images without MCs alone), object IoU, and the object TPR at given
  false marks per cm^2 of breast from the same sweep;
- per-case panels like the seed's Figure A2.

It then writes Tables 1-3, the FROC summary, paired Wilcoxon tests and bootstrap confidence
intervals to markdown, CSV, PNG and HTML files and to one MLflow experiment (one run per method
plus a summary run). See ``docs/study.md``.

The pure functions (:func:`truth_objects`, :func:`predicted_objects`, :func:`find_clusters`,
:func:`case_statistics`, :func:`image_detection`, :func:`froc_curve`, :func:`paired_wilcoxon`,
:func:`bootstrap_ci`, ...) work on numpy arrays and are tested on hand-built cases.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from bundle.clusters import find_clusters, single_linkage_groups
from bundle.metrics import (
    DEFAULT_FP_PER_CM2_RATES,
    DEFAULT_SWEEP_THRESHOLDS,
    aggregate,
    curve_summary,
    object_iou,
    object_stats,
    pixel_stats,
    pool_detection_curves,
    resolve_tracking_uri,
)
from bundle.objects import (  # noqa: F401  (re-exported: the study's public functions)
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
from bundle.reports import atomic_path, markdown_table, overlay_rgb, write_csv_atomic
from bundle.statistics import _nanmean, bootstrap_ci, bootstrap_indices, format_ci, format_p, paired_wilcoxon  # noqa: F401

__all__ = [
    "StudySettings",
    "method_needs",
    "method_label",
    "truth_objects",
    "object_max_prob",
    "predicted_objects",
    "single_linkage_groups",
    "find_clusters",
    "cluster_counts",
    "case_statistics",
    "resolve_density_threshold",
    "image_detection",
    "froc_curve",
    "froc_summary",
    "paired_wilcoxon",
    "bootstrap_indices",
    "bootstrap_ci",
    "format_ci",
    "format_p",
    "replace_marked_section",
    "invocation_command",
    "case_panel",
    "plot_curves",
    "plot_froc",
    "build_study_refiners",
    "MCStudy",
]

logger = logging.getLogger("mcref.study")

NAN = float("nan")

def _registry() -> Any:
    """The refiner registry with every method registered (MC-GenRef's rows register on import)."""
    import bundle.mcgenref  # noqa: F401  (registers mcgenref_init / mcgenref_ttgpr)
    import bundle.refine

    return bundle.refine


def method_label(name: str) -> str:
    """Table label of a method, from its :class:`bundle.refine.RefinerSpec` (else its name).

    Args:
        name: method name.
    """
    return _registry().method_label(name)


def method_needs(name: str) -> tuple[str, ...]:
    """What a method needs (``"segai"``, ``"inpainter"``), from its registered spec.

    Args:
        name: method name.
    """
    return _registry().method_needs(name)


#: per-image metrics of Table 1 (and 2), in column order.
TABLE1_METRICS: tuple[str, ...] = ("sensitivity", "ppv", "dice", "activation_rate", "true_activation_rate")
#: Table 1 metrics that get a paired test (the true activation rate does not depend on the method).
TESTED_METRICS: tuple[str, ...] = ("sensitivity", "ppv", "dice", "activation_rate")
#: per-image metrics of Table 4 (the MC-GenRef paper's columns), in column order.
TABLE4_METRICS: tuple[str, ...] = ("dice", "sensitivity", "fnr", "balanced_accuracy", "g_mean")
TABLE4_HEADERS: dict[str, str] = {
    "dice": "Dice", "sensitivity": "Recall", "fnr": "FNR", "balanced_accuracy": "Bal. Acc.", "g_mean": "G-Mean",
}
#: method-level reader-facing detection metrics of the study's detection table, in column order
#: (``tpr_at_<r>_fp_per_cm2`` columns follow, one per ``StudySettings.fp_per_cm2_rates``).
DETECTION_COLUMNS: tuple[str, ...] = (
    "fp_marks_per_image", "fp_marks_per_normal_image", "fp_clusters_per_image", "fp_clusters_per_normal_image",
    "cluster_sensitivity", "object_iou", "object_iou_detected", "object_tpr", "fp_marks_per_cm2",
)
#: (method, baseline) pairs whose Table 4 rows get paired p-values when both ran.
TABLE4_PAIRS: tuple[tuple[str, str], ...] = (("mcgenref_ttgpr", "mcgenref_init"), ("segai+genai", "segai"))

FILTERS: dict[str, str] = {
    "a": "all objects <= x px (Fig. 6a)",
    "b": "objects <= x px with exterior density >= threshold (Fig. 6b)",
    "c": "objects <= x px with interior density <= threshold (Fig. 6c)",
}

SECTION_MARK = "mcref-study"


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StudySettings:
    """Analysis parameters of a study (all have defaults; ``configs/evaluate_study.json#settings``).

    Args:
        threshold: probability threshold of the predicted mask (``prob >= threshold``).
        method_thresholds: per-method thresholds overriding ``threshold``.
        connectivity: 1 (4-) or 2 (8-connectivity) for truth and predicted objects.
        ring_px: width in pixels of the ring around an object that gives its exterior density.
        size_thresholds_px: x values of the Fig. 6 curves (objects with ``size_px <= x``);
            ``None`` means "all sizes".
        table3_sizes_px: size thresholds listed in Table 3 (``None`` = all sizes).
        exterior_density_min: Fig. 6b filter, ``{"raw": value or None, "percentile": p}``: objects
            with exterior density >= the raw value, or, when ``raw`` is None, >= the ``p``-th
            percentile of the exterior densities of all truth objects of the study.
        interior_density_max: Fig. 6c filter, same form: interior density <= threshold.
        min_object_px: truth objects smaller than this are left out of all object analyses.
        pred_min_object_px: predicted components smaller than this are ignored for clusters, FP
            objects and false alarms.
        false_alarm_unit: ``"object"``: an image without MCs is a false alarm when it has a
            predicted object (>= ``false_alarm_min_px`` pixels) in the breast; ``"cluster"``: when
            it has a predicted cluster.
        false_alarm_min_px: smallest predicted object that raises a false alarm.
        cluster_link_mm: single-linkage distance between MC centroids in mm.
        cluster_min_count: smallest number of MCs of a cluster.
        cluster_min_hit_mcs: a truth cluster is detected when one predicted cluster overlaps at
            least this many of its MCs.
        froc_thresholds: probability thresholds of the FROC sweep (None: a default grid); the
            operating threshold is always added.
        froc_fp_rates: false-positive clusters per image at which the FROC summary averages the
            sensitivity.
        tpr_min_diameter_mm: smallest equivalent diameter of a truth object counted for the object
            TPR of the TPR-vs-false-marks-per-cm^2 curve.
        fp_per_cm2_rates: false marks per cm^2 of breast at which that TPR is reported
            (``bundle.metrics.interpolate_tpr``).
        bootstrap_resamples: resamples (over images) of the bootstrap confidence intervals.
        confidence: confidence level of the intervals.
        seed: seed of the bootstrap.
        max_panels: per method, the first this many cases get a panel PNG (0: none).
        panel_max_side: longest side of the whole-image panels in pixels.
        zoom_px: side of the full-resolution zoom row of the panels.
    """

    threshold: float = 0.5
    method_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    connectivity: int = 2
    ring_px: int = 3
    size_thresholds_px: list[int | None] = dataclasses.field(
        default_factory=lambda: [5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, None]
    )
    table3_sizes_px: list[int | None] = dataclasses.field(default_factory=lambda: [20, 50, 100, None])
    exterior_density_min: dict[str, float | None] = dataclasses.field(
        default_factory=lambda: {"raw": None, "percentile": 50.0}
    )
    interior_density_max: dict[str, float | None] = dataclasses.field(
        default_factory=lambda: {"raw": None, "percentile": 50.0}
    )
    min_object_px: int = 1
    pred_min_object_px: int = 1
    false_alarm_unit: str = "object"
    false_alarm_min_px: int = 1
    cluster_link_mm: float = 5.0
    cluster_min_count: int = 3
    cluster_min_hit_mcs: int = 1
    froc_thresholds: list[float] | None = None
    froc_fp_rates: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    tpr_min_diameter_mm: float = 0.2
    fp_per_cm2_rates: list[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_FP_PER_CM2_RATES))
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    max_panels: int = 8
    panel_max_side: int = 512
    zoom_px: int = 192

    def __post_init__(self) -> None:
        if self.connectivity not in (1, 2):
            raise ValueError(f"connectivity must be 1 or 2, got {self.connectivity}")
        if self.false_alarm_unit not in ("object", "cluster"):
            raise ValueError(f"false_alarm_unit must be 'object' or 'cluster', got {self.false_alarm_unit!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        if self.cluster_min_count < 1 or self.cluster_min_hit_mcs < 1:
            raise ValueError("cluster_min_count and cluster_min_hit_mcs must be >= 1")

    @classmethod
    def from_any(cls, value: StudySettings | Mapping[str, Any] | None) -> StudySettings:
        """Settings from an instance, a mapping (unknown keys raise) or None (defaults).

        Args:
            value: settings, a dict of some fields, or None.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown study settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(value))

    def threshold_for(self, method: str) -> float:
        """Operating threshold of ``method``.

        Args:
            method: method name.
        """
        if method in self.method_thresholds:
            return float(self.method_thresholds[method])
        spec = _registry().REFINERS.get(method)  # the method's own declared operating point
        return float(spec.operating_point) if spec is not None else float(self.threshold)

    def froc_grid(self, method: str) -> np.ndarray:
        """Sorted FROC thresholds of ``method`` (operating threshold included).

        Args:
            method: method name.
        """
        base = self.froc_thresholds
        if base is None:
            base = list(DEFAULT_SWEEP_THRESHOLDS)
        return np.unique(np.asarray(list(base) + [self.threshold_for(method)], dtype=float))


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _detection_columns(settings: StudySettings) -> list[str]:
    """Columns of the detection table: :data:`DETECTION_COLUMNS` and one TPR per rate per cm^2."""
    return list(DETECTION_COLUMNS) + [f"tpr_at_{r:g}_fp_per_cm2" for r in settings.fp_per_cm2_rates]


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
# clusters
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# formatting, documents
# ----------------------------------------------------------------------------------------------


def replace_marked_section(path: str | os.PathLike, section: str, text: str, title: str = "# Results") -> None:
    """Write ``text`` between ``<!-- mcref-study:begin SECTION -->`` and ``<!-- mcref-study:end
    SECTION -->`` in ``path`` (replacing what was there, or appending the section; the file is
    created with ``title`` when missing). Atomic.

    Args:
        path: markdown file, e.g. ``docs/results.md``.
        section: section name.
        text: markdown to put in the section.
        title: first line of a new file.
    """
    p = Path(path)
    begin = f"<!-- {SECTION_MARK}:begin {section} -->"
    end = f"<!-- {SECTION_MARK}:end {section} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = p.read_text(encoding="utf-8") if p.exists() else f"{title}\n"
    i, j = old.find(begin), old.find(end)
    if i >= 0 and j > i:
        new = old[:i] + block + old[j + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_path(p, suffix=".md") as tmp:
        Path(tmp).write_text(new, encoding="utf-8")


def invocation_command(argv: Sequence[str] | None = None) -> str:
    """The shell command that started this process (``python -m monai.bundle run ...`` when run
    through MONAI's bundle runner).

    Args:
        argv: argument list; defaults to ``sys.argv``.
    """
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    head = args[0].replace("\\", "/")
    if head.endswith("monai/bundle/__main__.py"):
        return "python -m monai.bundle " + _shell_join(args[1:])
    return "python " + _shell_join(args)


def _shell_join(args: Sequence[str]) -> str:
    """Like ``shlex.join`` but readable for python literals: ``"['a','b']"`` instead of nested quotes."""
    out = []
    for a in args:
        q = shlex.quote(a)
        if q != a and re.fullmatch(r"[\w@%+=:,./#-]+", a) and not a.startswith("#"):
            q = a  # e.g. --settings#seed: '#' inside a word is not a comment
        elif q != a and "'" in a and not any(ch in a for ch in '"$`\\!'):
            q = f'"{a}"'
        out.append(q)
    return " ".join(out)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, suffix=path.suffix) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# pictures
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
# methods
# ----------------------------------------------------------------------------------------------
def build_study_refiners(
    methods: Sequence[str],
    segai_available: bool,
    segai_reason: str,
    inpainter: torch.nn.Module | None,
    inpainter_reason: str,
    refiner_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    extra_refiners: Mapping[str, Callable[..., dict]] | None = None,
    needs: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, Callable[..., dict]], dict[str, str]]:
    """Instantiate the study's methods, or give the reason each one is skipped.

    Args:
        methods: method names (``bundle.refine.REFINERS`` or ``extra_refiners``).
        segai_available: SegAI weights loaded.
        segai_reason: why not, when not.
        inpainter: the loaded inpainting network, or None.
        inpainter_reason: why there is none.
        refiner_kwargs: per-method keyword arguments of ``build_refiner``.
        extra_refiners: ready refiners by name (tests, new methods); they need SegAI unless
            ``needs`` says otherwise.
        needs: per-method requirements overriding the registered ones (:func:`method_needs`).

    Returns:
        ``(refiners, skipped)``: name -> refiner, and name -> reason.
    """
    REFINERS, build_refiner = _registry().REFINERS, _registry().build_refiner

    req = {k: tuple(v) for k, v in (needs or {}).items()}
    kwargs_all = refiner_kwargs or {}
    extra = dict(extra_refiners or {})
    refiners: dict[str, Callable[..., dict]] = {}
    skipped: dict[str, str] = {}
    for name in methods:
        if name in refiners or name in skipped:
            continue
        if name not in REFINERS and name not in extra:
            skipped[name] = f"unknown method (known: {sorted(set(REFINERS) | set(extra))})"
            continue
        need = req.get(name, method_needs(name))
        if "segai" in need and not segai_available:
            skipped[name] = f"needs SegAI weights: {segai_reason}"
            continue
        if "inpainter" in need and inpainter is None:
            skipped[name] = f"needs inpainter weights: {inpainter_reason}"
            continue
        try:
            if name in extra:
                refiners[name] = extra[name]
            else:
                kw = dict(kwargs_all.get(name, {}))
                if "inpainter" in need:
                    kw.setdefault("net", inpainter)
                refiners[name] = build_refiner(name, **kw)
        except Exception as e:  # a bad method config skips the method, never the study
            skipped[name] = f"could not be built: {type(e).__name__}: {e}"
    return refiners, skipped


def _load_weights(
    network: torch.nn.Module | None, path: str | os.PathLike | None, device: Any, what: str
) -> tuple[torch.nn.Module | None, str]:
    from bundle.networks import load_checkpoint

    if network is None:
        return None, f"no {what} network configured"
    if not path:
        return None, f"no {what} checkpoint path given"
    try:
        return load_checkpoint(network, path, device), ""
    except (FileNotFoundError, RuntimeError, OSError, ValueError, KeyError) as e:
        return None, str(e)


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------
def _case_name(item: Mapping[str, Any]) -> str:
    src = item.get("image")
    name = Path(str(src)).name if src is not None else "case"
    for ext in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".tiff", ".tif", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _meta(x: Any) -> dict[str, Any]:
    return dict(getattr(x, "meta", {}) or {})


class MCStudy:
    """Runs the whole study (see the module docstring and ``docs/study.md``).

    Args:
        datalists: datalist JSON path(s) (MONAI decathlon style; empty strings are skipped). Entries
            need ``image`` and ``label`` (``"label": null`` = image without MCs).
        output_dir: where everything is written.
        preprocessing: callable mapping ``{"image": path, "label": path|None}`` to the dict with
            ``image`` (normalised, (1, H, W)), ``label``, ``breast`` and ``image_raw`` (the image before
            normalisation; recovered from the ``norm_lower``/``norm_upper`` meta data when absent).
        network: the SegAI network (architecture only; weights come from ``ckpt_path``).
        ckpt_path: SegAI weights.
        inferer: SegAI inferer called ``inferer(x, network, breast=b)`` (e.g. ``BreastTileInferer``).
        methods: methods to evaluate (names of ``bundle.refine.REFINERS``).
        inpainter: the inpainting network (architecture only), or None.
        inpainter_ckpt_path: inpainter weights.
        refiner_kwargs: per-method keyword arguments of ``bundle.refine.build_refiner``.
        settings: :class:`StudySettings` or a dict of its fields.
        reference_method: the method the paired tests compare against (Table 1).
        table2_methods: the two methods of Table 2 (with / without the SegAI mask).
        datalist_key: datalist section.
        device: torch device.
        experiment_name: MLflow experiment (one per study series; one run per method and a summary run).
        tracking_uri: MLflow URI; None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlruns.db``.
        log_mlflow: log to MLflow.
        results_md: markdown file of the results (default ``<output_dir>/results.md``).
        results_doc: optional markdown file (e.g. ``docs/results.md``) whose marked section
            ``results_section`` is written or replaced.
        results_section: name of that section.
        command: the command to print in the results (default: this process's command line).
        config: the merged configuration, logged as ``config.json`` to the summary run.
        dataset_note: one line describing the data set in the report.
        extra_refiners: ready refiners by name (see :func:`build_study_refiners`).
        progress: progress bar over cases.
        weights: further weights files (name -> path) named and hashed in the MLflow run identity
            (the SegAI and inpainter checkpoints always are).
        dataset_name: data set name in the MLflow runs (default: the folder of the first datalist).
    """

    def __init__(
        self,
        datalists: str | Sequence[str],
        output_dir: str | os.PathLike,
        preprocessing: Callable[[dict], dict],
        network: torch.nn.Module | None,
        ckpt_path: str | os.PathLike | None,
        inferer: Callable[..., torch.Tensor],
        methods: Sequence[str] = ("segai", "segai+sp1", "segai+sp2", "segai+classical", "segai+genai", "grid_genai"),
        inpainter: torch.nn.Module | None = None,
        inpainter_ckpt_path: str | os.PathLike | None = None,
        refiner_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        settings: StudySettings | Mapping[str, Any] | None = None,
        reference_method: str = "segai+genai",
        table2_methods: Sequence[str] = ("segai+genai", "grid_genai"),
        datalist_key: str = "test",
        device: str | torch.device = "cpu",
        experiment_name: str = "mcref_study",
        tracking_uri: str | None = None,
        log_mlflow: bool = True,
        results_md: str | os.PathLike | None = None,
        results_doc: str | os.PathLike | None = None,
        results_section: str = "study",
        command: str | None = None,
        config: Mapping[str, Any] | None = None,
        dataset_note: str = "",
        extra_refiners: Mapping[str, Callable[..., dict]] | None = None,
        progress: bool = True,
        weights: Mapping[str, str | os.PathLike | None] | None = None,
        dataset_name: str | None = None,
    ) -> None:
        self.datalists = [datalists] if isinstance(datalists, (str, os.PathLike)) else list(datalists or [])
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.network = network
        self.ckpt_path = ckpt_path
        self.inferer = inferer
        self.methods = list(methods)
        self.inpainter = inpainter
        self.inpainter_ckpt_path = inpainter_ckpt_path
        self.refiner_kwargs = dict(refiner_kwargs or {})
        self.settings = StudySettings.from_any(settings)
        self.reference_method = reference_method
        self.table2_methods = list(table2_methods)
        self.datalist_key = datalist_key
        self.device = torch.device(device)
        self.experiment_name = experiment_name
        self.tracking_uri = tracking_uri
        self.log_mlflow = log_mlflow
        self.results_md = Path(results_md) if results_md else self.output_dir / "results.md"
        self.results_doc = Path(results_doc) if results_doc else None
        self.results_section = results_section
        self.command = command
        self.config = dict(config) if config is not None else None
        self.dataset_note = dataset_note
        self.extra_refiners = dict(extra_refiners or {})
        self.progress = progress
        self.weights = dict(weights or {})
        self.dataset_name = dataset_name
        self.result: dict[str, Any] = {}

    # ------------------------------------------------------------------ inputs
    def load_items(self) -> list[dict[str, Any]]:
        """The datalist entries of all datalists, with unique ``case`` names."""
        from bundle.data import load_datalist

        items: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for dl in self.datalists:
            if not dl:
                continue
            entries = load_datalist(dl, section=self.datalist_key)
            for e in entries:
                d = dict(e)
                name = str(d.get("case") or _case_name(d))
                if name in seen:  # e.g. case_000 in two phantom folders: prefix the folder name
                    name = f"{Path(str(dl)).parent.name}_{name}"
                base, k = name, 0
                while name in seen:
                    k += 1
                    name = f"{base}_{k}"
                seen[name] = 0
                d["case"] = name
                d["_datalist"] = str(dl)
                items.append(d)
        return items

    def _prepare_case(self, item: Mapping[str, Any]) -> dict[str, Any]:
        if "label" not in item:
            raise ValueError(f"{item.get('image')}: datalist entry has no 'label' (use null for images without MCs)")
        d = self.preprocessing({"image": item["image"], "label": item["label"]})
        img_t = d["image"]
        meta = _meta(img_t)
        image = _np2d(img_t, "image", np.float32)
        if "image_raw" in d and d["image_raw"] is not None:
            raw = _np2d(d["image_raw"], "image_raw", np.float32)
        elif "norm_lower" in meta and "norm_upper" in meta:
            raw = image * np.float32(meta["norm_upper"] - meta["norm_lower"]) + np.float32(meta["norm_lower"])
        else:
            raw = image
            logger.warning("%s: no image_raw and no normalisation meta data; densities use the normalised image", item["case"])
        truth = _mask(d["label"], "label") if d.get("label") is not None else np.zeros(image.shape, bool)
        breast = _mask(d["breast"], "breast") if d.get("breast") is not None else np.ones(image.shape, bool)
        if truth.shape != image.shape or breast.shape != image.shape or raw.shape != image.shape:
            raise ValueError(f"shapes differ: image {image.shape}, label {truth.shape}, breast {breast.shape}, raw {raw.shape}")
        sp = meta.get("working_spacing")
        spacing = (float(sp), float(sp)) if sp else _spacing(meta.get("spacing", (0.07, 0.07)))
        return {"image": image, "raw": raw, "truth": truth, "breast": breast, "spacing": spacing}

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Run the study: every case, every method, then tables, curves, files and MLflow.

        Returns:
            the result dictionary (also ``self.result``): ``methods``, ``skipped``, ``cases``,
            ``failed``, ``tables``, ``files``, ``mlflow_runs``, ``markdown``.
        """
        s = self.settings
        t_start = time.time()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        items = self.load_items()
        logger.info("study: %d cases from %s", len(items), [str(x) for x in self.datalists if x])

        seg_net, seg_reason = _load_weights(self.network, self.ckpt_path, self.device, "SegAI")
        needs_inp = any("inpainter" in method_needs(m) for m in self.methods)
        inp_net, inp_reason = (None, "not needed")
        if needs_inp:
            inp_net, inp_reason = _load_weights(self.inpainter, self.inpainter_ckpt_path, self.device, "inpainter")
        self.network = seg_net if seg_net is not None else self.network
        refiners, skipped = build_study_refiners(
            self.methods, seg_net is not None, seg_reason, inp_net, inp_reason, self.refiner_kwargs, self.extra_refiners
        )
        for m, why in skipped.items():
            logger.warning("method %s skipped: %s", m, why)
        methods = [m for m in self.methods if m in refiners]
        run_segai = seg_net is not None and any("segai" in method_needs(m) for m in methods)
        from bundle.pipeline import MCPipeline

        pipe = MCPipeline(seg_net, self.inferer, device=self.device)  # the one two-stage pipeline

        cases: list[dict[str, Any]] = []  # one per successfully prepared case
        failed: list[dict[str, str]] = []
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        objects: list[dict[str, Any]] = []
        maxprob: dict[str, list[float]] = {m: [] for m in methods}
        froc: dict[str, dict[str, list[Any]]] = {m: {"detected": [], "fp": [], "case": [], "curves": []} for m in methods}
        grids = {m: s.froc_grid(m) for m in methods}
        panels: dict[str, dict[str, str]] = {m: {} for m in methods}

        iterator: Any = items
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(items, desc="study cases", unit="case")
        for item in iterator:
            name = item["case"]
            t0 = time.perf_counter()
            try:
                c = self._prepare_case(item)
                seg = pipe.segai(c["image"], c["breast"]) if run_segai else None
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                logger.error("case %s failed: %s", name, msg)
                failed.append({"case": name, "method": "(all)", "error": msg})
                continue
            t_seg = time.perf_counter() - t0
            ci = len(cases)
            labels, objs = truth_objects(c["truth"], c["spacing"], c["raw"], s.ring_px, s.connectivity)
            row_mm, col_mm = c["spacing"]
            cents = np.array([[o["centroid_row"] * row_mm, o["centroid_col"] * col_mm] for o in objs]).reshape(-1, 2)
            tcid, n_tc = find_clusters(cents, s.cluster_link_mm, s.cluster_min_count)
            n_incl = sum(o["size_px"] >= s.min_object_px for o in objs)
            cases.append(
                {"case": name, "index": ci, "has_mcs": n_incl > 0, "n_objects": len(objs), "n_clusters": int(n_tc),
                 "height": c["image"].shape[0], "width": c["image"].shape[1], "spacing_mm": row_mm,
                 "segai_seconds": round(t_seg, 3), "datalist": item.get("_datalist", "")}
            )
            for o, cid in zip(objs, tcid):
                objects.append({"case": name, "case_index": ci, **o, "cluster_id": int(cid)})
            for m in methods:
                t1 = time.perf_counter()
                try:
                    out = pipe.refine(c["image"], seg, c["breast"], refiner=refiners[m], threshold=s.threshold_for(m))
                    prob = out["refined_prob"]
                    st = case_statistics(prob, c["truth"], c["breast"], c["spacing"], s, m, labels, objs, tcid, n_tc)
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    logger.error("case %s, method %s failed: %s", name, m, msg)
                    failed.append({"case": name, "method": m, "error": msg})
                    maxprob[m].extend([NAN] * len(objs))
                    continue
                row = {"case": name, **st["row"], "seconds": round(time.perf_counter() - t1, 3)}
                rows[m].append(row)
                maxprob[m].extend(st["max_prob"].tolist())
                froc[m]["detected"].append(st["froc"]["detected"])
                froc[m]["fp"].append(st["froc"]["fp"])
                froc[m]["case"].append(ci)
                froc[m]["curves"].append(st["curve"])
                if len(panels[m]) < s.max_panels:
                    ppath = self.output_dir / m / "panels" / f"{name}.png"
                    try:
                        det = st["max_prob"] >= s.threshold_for(m)
                        case_panel(
                            ppath, c["image"], prob, prob >= s.threshold_for(m), c["truth"], objs, det,
                            out.get("virtual_normal"), c["breast"],
                            title=f"{name} - {method_label(m)} (threshold {s.threshold_for(m):g})",
                            max_side=s.panel_max_side, zoom_px=s.zoom_px,
                        )
                        panels[m][name] = str(ppath)
                    except Exception as e:  # a picture never stops the study
                        logger.warning("panel of %s / %s failed: %s", name, m, e)
                del out, prob
            del c, seg, labels

        self.result = self._summarise(
            methods, skipped, cases, failed, rows, objects, maxprob, froc, grids, panels, seg_reason, inp_reason
        )
        self.result["seconds"] = round(time.time() - t_start, 1)
        self._write_outputs()
        return self.result

    # ------------------------------------------------------------------ aggregation
    def _summarise(
        self,
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
        s = self.settings
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
        ref = self.reference_method if self.reference_method in methods else None
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
        t2 = [m for m in self.table2_methods if m in methods]
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

    # ------------------------------------------------------------------ outputs
    def _write_outputs(self) -> None:
        r = self.result
        s = self.settings
        out = self.output_dir
        summ = out / "summary"
        files: dict[str, str] = {}
        for m in r["methods"]:
            write_csv_atomic(r["rows"][m], out / m / "per_case.csv")
            write_csv_atomic(r["object_rows"][m], out / m / "objects.csv")
            write_csv_atomic([p for p in r["froc_points"] if p["method"] == m], out / m / "froc.csv")
        write_csv_atomic(r["cases"], summ / "cases.csv")
        write_csv_atomic(r["failed"], summ / "failed_cases.csv", columns=["case", "method", "error"])
        write_csv_atomic(r["curve_rows"], summ / "fig6_curves.csv")
        write_csv_atomic(r["froc_points"], summ / "froc.csv")
        write_csv_atomic(
            [{"method": m, **r["metrics"][m]} for m in r["methods"]], summ / "metrics.csv"
        )
        if self.config is not None:
            _write_text(summ / "config.json", json.dumps(self.config, indent=2, default=str))
        pv = []
        for m in r["methods"]:
            for k, p in r["pvalues"][m].items():
                pv.append({"method": m, "reference": r["reference"], "metric": k, "p_value": p})
        write_csv_atomic(pv, summ / "pvalues.csv", columns=["method", "reference", "metric", "p_value"])

        xs = [float(x) if x is not None else float(max([v for v in s.size_thresholds_px if v is not None] or [1]) * 2)
              for x in s.size_thresholds_px]
        xt = ["all" if x is None else str(x) for x in s.size_thresholds_px]
        ext_thr, int_thr = r["density_thresholds"]["exterior_min"], r["density_thresholds"]["interior_max"]
        titles = {
            "a": "Fig. 6a: image-level detection, objects <= x px",
            "b": f"Fig. 6b: ... and exterior density >= {ext_thr:.4g}",
            "c": f"Fig. 6c: ... and interior density <= {int_thr:.4g}",
        }
        for f in FILTERS:
            cv = r["curves"][f]
            p = summ / f"fig6{f}.png"
            plot_curves(
                {m: (xs, cv[m]["y"]) for m in r["methods"]}, p, titles[f], "object size threshold x (pixels)",
                "image-level detection rate", bands={m: (cv[m]["lo"], cv[m]["hi"]) for m in r["methods"]},
                xticklabels=xt,
            )
            files[f"fig6{f}"] = str(p)
        p = summ / "froc.png"
        plot_froc(r["froc_plot"], p, s.froc_fp_rates)
        files["froc"] = str(p)
        r["files"] = files
        md = self.markdown()
        r["markdown"] = md
        _write_text(self.results_md, md)
        html_path = summ / "report.html"
        _write_text(html_path, self.html(html_path))
        files["results_md"] = str(self.results_md)
        files["report_html"] = str(html_path)
        if self.results_doc is not None:
            replace_marked_section(self.results_doc, self.results_section, md)
            files["results_doc"] = str(self.results_doc)
        r["mlflow_runs"] = {}
        if self.log_mlflow:
            try:
                r["mlflow_runs"] = self._log_mlflow()
            except Exception as e:  # tracking problems must not lose the computed study
                logger.exception("MLflow logging failed: %s", e)
                r["mlflow_error"] = f"{type(e).__name__}: {e}"
        logger.info("study written to %s (%s)", out, self.results_md)

    def _command(self) -> str:
        return self.command if self.command else invocation_command()

    def markdown(self) -> str:
        """The results as markdown (the tables, the curves as linked PNGs, failures, the command)."""
        r = self.result
        s = self.settings
        lab = {n: spec.label for n, spec in _registry().REFINERS.items()}
        lines = [f"## Study results: {self.experiment_name}", ""]
        lines += ["Produced by:", "", "```bash", self._command(), "```", ""]
        lines.append(
            f"{r['n_cases']} images ({r['n_with_mcs']} with MCs, {r['n_cases'] - r['n_with_mcs']} without), "
            f"{r['n_objects']} truth MC objects, {r['n_truth_clusters']} truth clusters; "
            f"run on {time.strftime('%Y-%m-%d %H:%M')} in {r.get('seconds', 0):.0f} s. {self.dataset_note}".rstrip()
        )
        lines.append("")
        lines.append(
            f"Operating threshold {s.threshold:g}"
            + (f" (per method: {s.method_thresholds})" if s.method_thresholds else "")
            + f"; {100 * s.confidence:g} % bootstrap CIs over images ({s.bootstrap_resamples} resamples, seed {s.seed}); "
            "p-values: two-sided paired Wilcoxon signed-rank tests over images."
        )
        lines.append("")
        if r["skipped"]:
            lines.append("Skipped methods:")
            lines += [f"- `{m}`: {why}" for m, why in r["skipped"].items()]
            lines.append("")
        ref = r["reference"]
        lines.append(
            "### Table 1: pixel-level metrics (percent, mean over images [95 % CI])"
            + (f", p vs {lab.get(ref, ref)}" if ref else " (reference method not run: no p-values)")
        )
        lines.append("")
        cols = ["method", "n"]
        heads = ["method", "n"]
        for k in TABLE1_METRICS:
            cols.append(k)
            heads.append({"sensitivity": "Sensitivity", "ppv": "PPV", "dice": "Dice", "activation_rate": "Activation rate",
                          "true_activation_rate": "True activation rate"}[k])
            if k in TESTED_METRICS:
                cols.append(f"p_{k}")
                heads.append("p")
        lines.append(markdown_table(r["table1"], cols, headers=heads) if r["table1"] else "(no method ran)\n")
        lines.append("### Table 2: with vs without the SegAI mask")
        lines.append("")
        if len(r["table2_methods"]) == 2:
            lines.append(f"p-values: {lab.get(r['table2_methods'][1])} vs {lab.get(r['table2_methods'][0])}.")
            lines.append("")
            lines.append(markdown_table(r["table2"], cols, headers=heads))
        else:
            lines.append(f"Not available: needs both {self.table2_methods} (ran: {r['table2_methods']}).\n")
        ext_thr, int_thr = r["density_thresholds"]["exterior_min"], r["density_thresholds"]["interior_max"]
        lines.append("### Table 3: image-level (patient) detection rate by object size and density (percent [95 % CI])")
        lines.append("")
        lines.append(
            "An image with MCs counts as detected when a predicted-positive pixel falls in at least one of its "
            "included objects; images without included objects are left out of that cell (n_images). "
            + (f"p: paired Wilcoxon test of the per-image 0/1 detections vs {lab.get(ref, ref)}. " if ref else "")
            + 
            f"Density thresholds on the raw scale: exterior >= {ext_thr:.5g} ({_spec_text(s.exterior_density_min)}), "
            f"interior <= {int_thr:.5g} ({_spec_text(s.interior_density_max)}); ring width {s.ring_px} px."
        )
        lines.append("")
        mcols = [lab.get(m, m) for m in r["methods"]]
        for f, desc in FILTERS.items():
            lines.append(f"({f}) {desc}")
            lines.append("")
            rows3 = list(r["table3"][f]) + ([r["specificity_row"]] if f == "a" else [])
            lines.append(markdown_table(rows3, ["objects", "n_images"] + mcols) if r["methods"] else "(no method ran)\n")
        links = [f"[fig6{f}]({_rel(r['files'][f'fig6{f}'], self.results_md)})" for f in FILTERS]
        lines.append("Curves (Fig. 6): " + ", ".join(links))
        lines.append("")
        lines.append("### Table 4: class-balanced pixel metrics (MC-GenRef's columns; percent, mean over images [95 % CI])")
        lines.append("")
        lines.append(
            "Recall = sensitivity, FNR = 1 - recall, specificity counted inside the breast, "
            "Bal. Acc. = (recall + specificity) / 2, G-Mean = sqrt(recall x specificity); recall-based "
            "columns average over images with MCs. p: paired Wilcoxon test against the method named in `vs`."
        )
        lines.append("")
        cols4, heads4 = ["method", "n"], ["method", "n"]
        for k in TABLE4_METRICS:
            cols4 += [k, f"p_{k}"]
            heads4 += [TABLE4_HEADERS[k], "p"]
        cols4.append("vs")
        heads4.append("vs")
        lines.append(markdown_table(r["table4"], cols4, headers=heads4) if r.get("table4") else "(no method ran)\n")
        lines.append("")
        lines.append(
            f"### Cluster FROC (clusters: >= {s.cluster_min_count} MCs, single linkage {s.cluster_link_mm:g} mm; "
            f"a truth cluster is detected when one predicted cluster hits >= {s.cluster_min_hit_mcs} of its MCs)"
        )
        lines.append("")
        lines.append(
            "FROC score = mean cluster sensitivity at "
            + ", ".join(f"{f:g}" for f in s.froc_fp_rates)
            + " false-positive clusters per image (best sensitivity at or below each rate). "
            f"[FROC plot]({_rel(r['files']['froc'], self.results_md)})"
        )
        lines.append("")
        fcols = ["method", "froc_score"] + [f"sens@{f:g}" for f in s.froc_fp_rates] + ["op_sensitivity", "op_fp_per_image"]
        lines.append(markdown_table(r["froc_rows"], fcols) if r["froc_rows"] else "(no method ran)\n")
        lines.append("### Detection metrics (reader view, at the operating threshold)")
        lines.append("")
        lines.append(
            "False marks: predicted components touching no truth MC (in the breast), per image and per image "
            "without MCs (n_normal images); FP clusters: predicted clusters hitting no truth MC; cluster "
            "sensitivity: detected / all truth clusters; object IoU: IoU of each truth MC with the predicted "
            "components overlapping it, mean over all truth MCs (missed = 0) and over the detected ones; object "
            f"TPR: truth MCs of >= {s.tpr_min_diameter_mm:g} mm detected; TPR at r FP/cm^2: the object TPR of the "
            "threshold sweep against false marks per cm^2 of breast, interpolated linearly (HDoGReg's operating "
            "points). See docs/metrics.md."
        )
        lines.append("")
        dcols = ["method", "n_normal"] + _detection_columns(s)
        lines.append(markdown_table(r.get("detection_rows", []), dcols) if r.get("detection_rows") else "(no method ran)\n")
        lines.append("### Failed cases")
        lines.append("")
        if r["failed"]:
            lines.append(markdown_table(r["failed"], ["case", "method", "error"]))
        else:
            lines.append("None.\n")
        runs = r.get("mlflow_runs") or {}
        if runs:
            lines.append(f"MLflow experiment `{self.experiment_name}`: " + ", ".join(f"{k}=`{v}`" for k, v in runs.items()))
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def html(self, html_path: Path) -> str:
        """A self-contained HTML report: tables, embedded curve PNGs, links to the per-case panels.

        Args:
            html_path: where the report will be written (panel links are relative to it).
        """
        r = self.result
        s = self.settings
        lab = {n: spec.label for n, spec in _registry().REFINERS.items()}
        esc = html.escape
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>mcref study {esc(self.experiment_name)}</title>",
            "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;"
            "margin:0.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}"
            "th{background:#eee}td:first-child{text-align:left}img.curve{width:560px;margin:4px}"
            "code{background:#f4f4f4;padding:2px 4px}</style></head><body>",
            f"<h1>mcref study: {esc(self.experiment_name)}</h1>",
            f"<p>Command: <code>{esc(self._command())}</code></p>",
            f"<p>{r['n_cases']} images ({r['n_with_mcs']} with MCs), {r['n_objects']} truth objects, "
            f"{r['n_truth_clusters']} truth clusters. {esc(self.dataset_note)}</p>",
        ]
        if r["skipped"]:
            parts.append("<p>Skipped methods:</p><ul>" + "".join(
                f"<li><code>{esc(m)}</code>: {esc(why)}</li>" for m, why in r["skipped"].items()) + "</ul>")
        cols = ["method", "n"]
        for k in TABLE1_METRICS:
            cols.append(k)
            if k in TESTED_METRICS:
                cols.append(f"p_{k}")
        ref = r["reference"]
        parts.append(f"<h2>Table 1: pixel-level metrics (percent [95 % CI]); p vs {esc(lab.get(ref, str(ref)))}</h2>")
        parts.append(_html_table(r["table1"], cols))
        parts.append("<h2>Table 2: with vs without the SegAI mask</h2>")
        parts.append(_html_table(r["table2"], cols) if r["table2"] else "<p>not available</p>")
        cols4 = ["method", "n"] + [c for k in TABLE4_METRICS for c in (k, f"p_{k}")] + ["vs"]
        parts.append("<h2>Table 4: class-balanced pixel metrics (percent [95 % CI])</h2>")
        parts.append(_html_table(r.get("table4", []), cols4))
        mcols = [lab.get(m, m) for m in r["methods"]]
        parts.append("<h2>Table 3: image-level detection by object size and density (percent [95 % CI])</h2>")
        for f, desc in FILTERS.items():
            rows3 = list(r["table3"][f]) + ([r["specificity_row"]] if f == "a" else [])
            parts.append(f"<h3>({f}) {esc(desc)}</h3>" + _html_table(rows3, ["objects", "n_images"] + mcols))
        parts.append("<h2>Figure 6 curves and cluster FROC</h2><div>")
        for key in ("fig6a", "fig6b", "fig6c", "froc"):
            parts.append(f"<img class='curve' alt='{key}' src='{_png_data_uri(r['files'][key])}'>")
        parts.append("</div>")
        fcols = ["method", "froc_score"] + [f"sens@{f:g}" for f in s.froc_fp_rates] + ["op_sensitivity", "op_fp_per_image"]
        parts.append("<h3>FROC summary</h3>" + _html_table(r["froc_rows"], fcols))
        parts.append("<h3>Detection metrics (reader view, at the operating threshold)</h3>"
                     + _html_table(r.get("detection_rows", []), ["method", "n_normal"] + _detection_columns(s)))
        parts.append("<h2>Per-case panels</h2>")
        case_names = [c["case"] for c in r["cases"]]
        prow = []
        for name in case_names:
            row = {"case": name}
            for m in r["methods"]:
                pth = r["panels"].get(m, {}).get(name)
                row[lab.get(m, m)] = f"<a href='{esc(_rel(pth, html_path))}'>panel</a>" if pth else ""
            prow.append(row)
        parts.append(_html_table(prow, ["case"] + mcols, raw=True))
        parts.append("<h2>Failed cases</h2>")
        parts.append(_html_table(r["failed"], ["case", "method", "error"]) if r["failed"] else "<p>None.</p>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def _log_mlflow(self) -> dict[str, str]:
        """One parent run for the study (role ``summary``: tables via ``log_table``, curves, report,
        results.md, resolved config) and one child run per method (metrics, params, per-case table,
        per-case/object/FROC CSVs, panels), all with the run identity of :mod:`bundle.tracking`
        (weights hashes, bundle version, git commit, data set digest, versions) and tagged with a study id."""
        import mlflow
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from bundle.tracking import find_live_parser, get_or_create_experiment, log_identity, ui_hint

        r = self.result
        s = self.settings
        uri = resolve_tracking_uri(self.tracking_uri, self.output_dir)
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp_id = get_or_create_experiment(client, self.experiment_name, uri)
        study_id = time.strftime("%Y%m%d-%H%M%S")
        now = int(time.time() * 1000)
        weights = {"segai": self.ckpt_path, "inpainter": self.inpainter_ckpt_path, **self.weights}
        items = self.load_items()
        datasets = {"evaluation": items}
        first = next((d for d in self.datalists if d), None)
        dataset_name = self.dataset_name or (Path(str(first)).absolute().parent.name if first else None)
        source = str(Path(str(first)).absolute()) if first else None
        bundle_root = Path(__file__).resolve().parents[1]
        parser = find_live_parser()
        common = {
            "n_cases": str(r["n_cases"]), "n_with_mcs": str(r["n_with_mcs"]),
            "datalists": ";".join(str(d) for d in self.datalists if d)[:5000],
            "ckpt_path": str(self.ckpt_path), "inpainter_ckpt_path": str(self.inpainter_ckpt_path),
            "reference_method": str(r["reference"]),
        }
        for k, v in dataclasses.asdict(s).items():
            common[f"study.{k}"] = json.dumps(v)[:5000]
        runs: dict[str, str] = {}
        base_tags = {"mcref.study_id": study_id, "mcref.command": self._command()[:5000]}

        def table(rows: Any) -> dict[str, list] | None:
            if not isinstance(rows, list) or not rows or not all(isinstance(x, Mapping) for x in rows):
                return None
            cols = list(dict.fromkeys(k for x in rows for k in x))
            return {c: [x.get(c) if isinstance(x.get(c), (int, float, str, bool)) or x.get(c) is None else str(x.get(c))
                        for x in rows] for c in cols}

        parent = client.create_run(exp_id, run_name="summary", tags={**base_tags, "mcref.role": "summary"})
        pid = parent.info.run_id
        runs["summary"] = pid
        status = "FINISHED"
        try:
            log_identity(client, pid, "study", bundle_root, weights, datasets, dataset_name, source,
                         config=self.config, parser=parser)
            for m in r["methods"]:
                rid = client.create_run(exp_id, run_name=m, tags={**base_tags, "mcref.role": "method",
                                                                  MLFLOW_PARENT_RUN_ID: pid}).info.run_id
                runs[m] = rid
                cstatus = "FINISHED"
                try:
                    log_identity(client, rid, "study", bundle_root, weights, datasets, dataset_name, source,
                                 parser=parser, log_config=False)
                    metrics = [Metric(k.replace("@", "_at_"), float(v), now, 0) for k, v in r["metrics"][m].items()
                               if isinstance(v, (int, float))]
                    for k, p in r["pvalues"][m].items():
                        metrics.append(Metric(f"p_vs_ref_{k}", float(p), now, 0))
                    rk = json.dumps(self.refiner_kwargs.get(m, {}), default=str)[:5000]
                    own = {"method": m, "threshold": str(s.threshold_for(m)), "refiner_kwargs": rk}
                    params = [Param(k, v) for k, v in {**common, **own}.items()]
                    for i in range(0, len(metrics), 900):
                        client.log_batch(rid, metrics=metrics[i:i + 900], params=params if i == 0 else [],
                                         tags=[RunTag("mcref.method_label", method_label(m))] if i == 0 else [])
                    per_case = table(r["rows"][m])
                    if per_case:
                        client.log_table(rid, per_case, "tables/per_case.json")
                    mdir = self.output_dir / m
                    for fn in ("per_case.csv", "objects.csv", "froc.csv"):
                        if (mdir / fn).is_file():
                            client.log_artifact(rid, str(mdir / fn))
                    if (mdir / "panels").is_dir():
                        client.log_artifacts(rid, str(mdir / "panels"), "panels")
                    client.log_artifact(rid, str(self.results_md))
                except Exception:
                    cstatus = "FAILED"
                    raise
                finally:
                    client.set_terminated(rid, cstatus)
            tags = [RunTag("mcref.skipped", json.dumps(r["skipped"])[:5000]),
                    RunTag("mcref.method_runs", json.dumps({k: v for k, v in runs.items() if k != "summary"})[:5000])]
            params = [Param(k, v) for k, v in {**common, "methods": json.dumps(r["methods"]),
                                               "skipped": json.dumps(sorted(r["skipped"]))}.items()]
            client.log_batch(pid, metrics=[Metric("n_failed", float(len(r["failed"])), now, 0)], params=params, tags=tags)
            for name in ("table1", "table2", "table3", "table4", "detection_rows", "froc_rows", "curve_rows"):
                t = table(r.get(name))
                if t:
                    client.log_table(pid, t, f"tables/{name}.json")
            metrics_table = table([{"method": m, **r["metrics"][m]} for m in r["methods"]])
            if metrics_table:
                client.log_table(pid, metrics_table, "tables/metrics.json")
            client.log_artifacts(pid, str(self.output_dir / "summary"), "summary")
            client.log_artifact(pid, str(self.results_md))
        except Exception:
            status = "FAILED"
            raise
        finally:
            client.set_terminated(pid, status)
        logger.info("MLflow: experiment %s (%s), runs %s", self.experiment_name, uri, runs)
        print(ui_hint(uri, exp_id, pid) + f"\n  (parent run of the study; one child run per method: {', '.join(r['methods'])})",
              flush=True)
        return runs


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], raw: bool = False) -> str:
    """HTML table of ``rows`` (values escaped unless ``raw``; floats with 4 significant digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = "n/a" if math.isnan(v) else f"{v:.4g}"
        text = "" if v is None else str(v)
        return text if raw else html.escape(text)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _spec_text(spec: Mapping[str, Any] | float | None) -> str:
    if spec is None:
        return "off"
    if isinstance(spec, (int, float)):
        return "raw value"
    if spec.get("raw") is not None:
        return "raw value"
    return f"{float(spec.get('percentile', NAN)):g}th percentile of all truth objects"


def _rel(path: str | os.PathLike, start_file: str | os.PathLike) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(start_file))).replace(os.sep, "/")
    except ValueError:
        return str(path)
