"""Ignite pieces that report the per-image MC metrics during a MONAI evaluation.

- :class:`MCMetricsHandler`: per-image metrics (:mod:`bundle.image_metrics`, and the threshold sweep
  of :mod:`bundle.detection_curves`) on every iteration, averages into ``engine.state.metrics`` at
  the end of each epoch, per-case CSV and overlay PNGs.
- :class:`ActivationRate`: an ignite ``Metric`` for MONAI ``key_val_metric``/``additional_metrics``.

The metric functions themselves are pure and live in :mod:`bundle.image_metrics`; these classes
only read engine outputs (:mod:`bundle.batch_items`), call them and write the results.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from bundle.batch_items import _case_name, _decollate, _get, _meta_of, _spacing_from_meta
from bundle.detection_curves import (
    CURVE_COLUMNS,
    DEFAULT_FP_PER_CM2_RATES,
    DEFAULT_FROC_FP_RATES,
    curve_metric_names,
    curve_summary,
    detection_curve,
    pool_detection_curves,
)
from bundle.image_metrics import (
    NAN,
    _as_2d,
    _as_mask,
    _ratio,
    _spacing_pair,
    _to_numpy,
    aggregate,
    object_iou,
    object_stats,
    pixel_stats,
)
from bundle.reports import overlay_png, write_csv_atomic

__all__ = ["DEFAULT_METRIC_NAMES", "OBJECT_COLUMNS", "MCMetricsHandler", "ActivationRate"]

#: logger of the handlers (the name they had when they lived in :mod:`bundle.metrics`).
LOGGER_NAME = "bundle.metrics"


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


#: columns of the per-object CSV written by :class:`MCMetricsHandler`.
OBJECT_COLUMNS: tuple[str, ...] = (
    "case", "object_id", "size_px", "diameter_mm", "centroid_row", "centroid_col", "detected", "included"
)


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
        self.logger = logging.getLogger(name or LOGGER_NAME)
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
