"""Microcalcification (MC) segmentation metrics and the ignite handlers that report them.

This module is the entry point configs, scripts and docs name (``bundle.metrics.X``); it holds no
code of its own and re-exports:

- pure per-image functions (numpy in, python values out), :mod:`bundle.image_metrics`:
  :func:`pixel_stats` (confusion counts, Dice, sensitivity, PPV, activation rates, specificity,
  balanced accuracy, G-mean), :func:`object_stats` (truth MC objects and whether each is hit),
  :func:`aggregate` (means over cases and pooled rates), :func:`object_iou` (HDoGReg's object IoU),
  :func:`truth_clusters` and :func:`cluster_stats` (MC clusters of truth and prediction);
- the reader-facing threshold sweeps (``docs/metrics.md``, "Detection metrics"),
  :mod:`bundle.detection_curves`: :func:`detection_curve`, :func:`pool_detection_curves`,
  :func:`interpolate_tpr`, :func:`curve_summary`, :func:`curve_metric_names` (cluster FROC, object
  TPR at given false marks per cm^2 of breast);
- the ignite pieces: :class:`MCMetricsHandler` and :class:`ActivationRate`
  (:mod:`bundle.metric_handlers`), :class:`MLflowArtifactsHandler` (:mod:`bundle.mlflow_artifacts`).

Definitions follow the supplement of the generative-refinement paper (section E, see
``docs/metrics.md``); every metric is computed per image and averaged over images.
"""

from __future__ import annotations

from bundle.detection_curves import (
    CURVE_COLUMNS,
    DEFAULT_FP_PER_CM2_RATES,
    DEFAULT_FROC_FP_RATES,
    DEFAULT_SWEEP_THRESHOLDS,
    curve_metric_names,
    curve_summary,
    detection_curve,
    interpolate_tpr,
    pool_detection_curves,
)
from bundle.image_metrics import (
    LOSS_STAGES,
    aggregate,
    cluster_stats,
    local_contrast_to_noise,
    loss_stages,
    object_iou,
    object_stats,
    pixel_stats,
    truth_clusters,
)
from bundle.metric_handlers import DEFAULT_METRIC_NAMES, OBJECT_COLUMNS, ActivationRate, MCMetricsHandler
from bundle.mlflow_artifacts import MLflowArtifactsHandler, resolve_tracking_uri

__all__ = [
    "LOSS_STAGES",
    "local_contrast_to_noise",
    "loss_stages",
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
