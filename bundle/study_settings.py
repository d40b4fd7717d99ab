"""The study's analysis settings, method registry look-ups and table layout.

:class:`StudySettings` holds every analysis parameter of :class:`bundle.study.MCStudy`
(``configs/evaluate_study.json#settings``); :func:`method_label` and :func:`method_needs` read a
method's row of the refiner registry (:mod:`bundle.refine`, with MC-GenRef's rows registered); the
constants name the columns of the study's tables. Re-exported by :mod:`bundle.study`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from bundle.detection_curves import DEFAULT_FP_PER_CM2_RATES, DEFAULT_SWEEP_THRESHOLDS

__all__ = [
    "StudySettings",
    "method_label",
    "method_needs",
    "TABLE1_METRICS",
    "TESTED_METRICS",
    "TABLE4_METRICS",
    "TABLE4_HEADERS",
    "DETECTION_COLUMNS",
    "TABLE4_PAIRS",
    "FILTERS",
    "SECTION_MARK",
]


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


def _detection_columns(settings: StudySettings) -> list[str]:
    """Columns of the detection table: :data:`DETECTION_COLUMNS` and one TPR per rate per cm^2."""
    return list(DETECTION_COLUMNS) + [f"tpr_at_{r:g}_fp_per_cm2" for r in settings.fp_per_cm2_rates]
