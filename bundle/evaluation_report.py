"""Pictures and tables of an evaluation run: :class:`EvaluationReportHandler` adds, to the MLflow run
of a :class:`bundle.tracking.TrackingHandler`, the threshold-sweep curves, detection by MC size and
density, the per-case table and panels of the worst cases, from the images
:class:`bundle.metric_handlers.MCMetricsHandler` scores.

Re-exported by :mod:`bundle.tracking`; see ``docs/tracking.md``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from ignite.engine import Engine, Events

from bundle.batch_items import _decollate, _get
from bundle.figures import _rate_figure, _to_2d

if TYPE_CHECKING:
    from bundle.tracking import TrackingHandler

__all__ = ["EvaluationReportHandler"]


# ----------------------------------------------------------------------------------------------
# evaluation report: curves, table, worst cases
# ----------------------------------------------------------------------------------------------
class EvaluationReportHandler:
    """
    Ignite handler adding pictures and tables to an evaluation run, from the same images
    :class:`bundle.metrics.MCMetricsHandler` scores (attach it after that handler and after the
    :class:`TrackingHandler`).

    Logged at EPOCH_COMPLETED into the tracker's run (``mlflow.log_figure`` / ``log_table``):

    - ``curves/sensitivity_vs_activation.png``: pixel sensitivity and activation rate (means over
      images, as in the paper) at each sweep threshold, operating threshold marked;
    - ``curves/cluster_froc.png`` and ``curves/object_tpr_vs_fp_per_cm2.png`` from the metrics
      handler's pooled sweep (when it sweeps);
    - ``curves/detection_vs_size.png`` (truth MCs with diameter <= x detected at the operating
      threshold) and ``curves/detection_vs_density.png`` (by interior - exterior mean intensity of
      the normalised image, in quantile bins);
    - ``tables/per_case.json`` (the per-case table), ``tables/threshold_sweep.json``;
    - ``worst/by_false_marks.png`` and ``worst/by_missed_mcs.png``: the ``n_worst`` cases with the
      most false marks / missed MCs, each view with false marks (red), missed MCs (yellow) and
      detected MCs (green) circled.

    Args:
        tracker: the :class:`TrackingHandler` owning the run.
        metrics_handler: the :class:`bundle.metrics.MCMetricsHandler` on the same engine.
        thresholds: pixel sweep thresholds (default: the metrics handler's grid).
        n_worst: cases per worst-case panel.
        thumb_side: longest side of a view in the panels.
        density_bins: quantile bins of the density curve.
    """

    def __init__(self, tracker: TrackingHandler, metrics_handler: Any, thresholds: Sequence[float] | None = None,
                 n_worst: int = 4, thumb_side: int = 384, density_bins: int = 5) -> None:
        self.tracker = tracker
        self.metrics = metrics_handler
        grid = thresholds if thresholds is not None else getattr(metrics_handler, "grid", [metrics_handler.threshold])
        self.thresholds = np.unique(np.asarray(list(grid) + [metrics_handler.threshold], dtype=float))
        self.n_worst = int(n_worst)
        self.thumb_side = int(thumb_side)
        self.density_bins = int(density_bins)
        self.reset()

    def reset(self) -> None:
        """Forget the previous epoch."""
        self.sweep_rows: list[dict[str, Any]] = []
        self.objects: list[dict[str, Any]] = []
        self.views: dict[str, dict[str, Any]] = {}

    def attach(self, engine: Engine) -> None:
        """Register EPOCH_STARTED, ITERATION_COMPLETED and EPOCH_COMPLETED handlers.

        Args:
            engine: the evaluator.
        """
        for event, fn in ((Events.EPOCH_STARTED, lambda e: self.reset()), (Events.ITERATION_COMPLETED, self.iteration_completed),
                          (Events.EPOCH_COMPLETED, self.epoch_completed)):
            engine.add_event_handler(event, fn)

    def iteration_completed(self, engine: Engine) -> None:
        """Sweep and describe the images of this iteration (rows already added by the metrics handler).

        Args:
            engine: the evaluator.
        """
        outputs = _decollate(engine.state.output) or []
        batch = _decollate(getattr(engine.state, "batch", None)) or []
        rows = self.metrics.rows[-len(outputs):] if outputs else []
        m = self.metrics
        for i, out in enumerate(outputs):
            b = batch[i] if i < len(batch) else None

            def pick(key: str | None) -> Any:
                if key is None:
                    return None
                v = _get(out, key)
                return _get(b, key) if v is None and b is not None else v

            if i >= len(rows):
                break
            row = rows[i]
            prob = m._prob_2d(pick(m.pred_key))
            truth = np.asarray(_to_2d(pick(m.label_key)) > 0.5) if pick(m.label_key) is not None else np.zeros(prob.shape, bool)
            br = pick(m.breast_key)
            breast = np.asarray(_to_2d(br) > 0.5) if br is not None else np.ones(prob.shape, bool)
            image = _to_2d(pick(m.image_key))
            self._add(row, prob, truth, breast, image)

    def _add(self, row: Mapping[str, Any], prob: np.ndarray, truth: np.ndarray, breast: np.ndarray,
             image: np.ndarray | None) -> None:
        from scipy import ndimage

        from bundle.study_analysis import truth_objects

        case = str(row["case"])
        spacing = (float(row["spacing_row_mm"]), float(row["spacing_col_mm"]))
        p_b = prob[breast]
        p_t = prob[truth & breast]
        n_b, n_t = max(int(breast.sum()), 1), int((truth & breast).sum())
        for t in self.thresholds:
            pos_b = int((p_b >= t).sum())
            tp = int((p_t >= t).sum())
            self.sweep_rows.append({"case": case, "threshold": float(t), "activation_rate": pos_b / n_b,
                                    "sensitivity": tp / n_t if n_t else float("nan")})
        img = image if image is not None and image.ndim == 2 and image.shape == prob.shape else None
        labels, objs = truth_objects(truth, spacing, image_raw=img, ring_px=3)
        mask = (prob >= self.metrics.threshold) & breast
        hit = np.zeros(len(objs) + 1, bool)
        if objs:
            hit[np.unique(labels[mask & (labels > 0)])] = True
        for o in objs:
            self.objects.append({"case": case, "diameter_mm": o["diameter_mm"], "detected": bool(hit[o["object_id"]]),
                                 "contrast": o["interior_density"] - o["exterior_density"]})
        # worst-case candidates: keep the view only while it may be among the worst
        fp = int(row.get("n_fp_objects", 0))
        missed = int(row.get("n_objects", 0)) - int(row.get("n_detected", 0))
        keep = any(self._rank_ok(key, val) for key, val in (("fp", fp), ("missed", missed)))
        if not keep:
            return
        plab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        fp_c, det_c, miss_c = [], [], []
        if n:
            idx = np.arange(1, n + 1)
            touches = ndimage.maximum(truth, plab, idx) > 0
            cents = ndimage.center_of_mass(mask, plab, idx)
            fp_c = [c for c, t in zip(cents, touches) if not t]
        for o in objs:
            (det_c if hit[o["object_id"]] else miss_c).append((o["centroid_row"], o["centroid_col"]))
        f = max(1, int(math.ceil(max(prob.shape) / self.thumb_side)))
        base = img if img is not None else prob
        thumb = base[::f, ::f].astype(np.float32)
        self.views[case] = {"fp": fp, "missed": missed, "thumb": thumb, "f": f, "fp_c": fp_c, "det_c": det_c,
                            "miss_c": miss_c}
        self._prune()

    def _rank_ok(self, key: str, value: int) -> bool:
        if value <= 0:
            return False
        vals = sorted((v[key] for v in self.views.values()), reverse=True)
        return len(vals) < self.n_worst or value > vals[self.n_worst - 1]

    def _prune(self) -> None:
        keep: set[str] = set()
        for key in ("fp", "missed"):
            ranked = sorted(self.views, key=lambda c: -self.views[c][key])
            keep |= {c for c in ranked[: self.n_worst] if self.views[c][key] > 0}
        self.views = {c: v for c, v in self.views.items() if c in keep}

    # ------------------------------------------------------------------ figures
    def _sweep_table(self) -> list[dict[str, float]]:
        out = []
        for t in self.thresholds:
            rs = [r for r in self.sweep_rows if r["threshold"] == t]
            sens = [r["sensitivity"] for r in rs if not math.isnan(r["sensitivity"])]
            out.append({"threshold": float(t), "sensitivity": float(np.mean(sens)) if sens else float("nan"),
                        "activation_rate": float(np.mean([r["activation_rate"] for r in rs])) if rs else float("nan")})
        return out

    def _worst_panel(self, key: str, title: str) -> Any | None:
        from matplotlib.figure import Figure

        cases = sorted((c for c in self.views if self.views[c][key] > 0), key=lambda c: -self.views[c][key])[: self.n_worst]
        if not cases:
            return None
        fig = Figure(figsize=(3.2 * len(cases), 4.0))
        for j, c in enumerate(cases):
            v = self.views[c]
            ax = fig.add_subplot(1, len(cases), j + 1)
            ax.imshow(v["thumb"], cmap="gray")
            for pts, colour in ((v["fp_c"], "red"), (v["miss_c"], "yellow"), (v["det_c"], "lime")):
                if pts:
                    arr = np.asarray(pts, float) / v["f"]
                    ax.scatter(arr[:, 1], arr[:, 0], s=60, facecolors="none", edgecolors=colour, linewidths=1.0)
            ax.set_title(f"{c}\nfalse marks {v['fp']}, missed MCs {v['missed']}", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{title} (red: false mark, yellow: missed MC, green: detected MC)", fontsize=9)
        fig.tight_layout()
        return fig

    def epoch_completed(self, engine: Engine) -> None:
        """Log the curves, tables and worst-case panels into the tracker's run.

        Args:
            engine: the evaluator.
        """
        from matplotlib.figure import Figure

        client, run_id = self.tracker.client, self.tracker.run_id
        if run_id is None or self.tracker.cur_run is None:
            return
        op = self.metrics.threshold
        sweep = self._sweep_table()
        fig = Figure(figsize=(6, 4.2))
        ax = fig.add_subplot(1, 1, 1)
        x = np.asarray([r["activation_rate"] for r in sweep]) * 100
        y = np.asarray([r["sensitivity"] for r in sweep]) * 100
        ax.plot(x, y, marker="o", ms=3)
        for r, xi, yi in zip(sweep, x, y):
            ax.annotate(f"{r['threshold']:g}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if r["threshold"] == op:
                ax.plot([xi], [yi], marker="*", ms=12, color="C3")
        if np.all(x > 0):
            ax.set_xscale("log")
        ax.set_xlabel("activation rate (% of breast)")
        ax.set_ylabel("pixel sensitivity (%)")
        ax.set_title(f"sensitivity vs activation over thresholds (star: operating threshold {op:g})", fontsize=9)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        client.log_figure(run_id, fig, "curves/sensitivity_vs_activation.png")
        client.log_table(run_id, {k: [r[k] for r in sweep] for k in ("threshold", "sensitivity", "activation_rate")},
                         "tables/threshold_sweep.json")

        curve = getattr(self.metrics, "curve", None) or {}
        if len(curve.get("threshold", [])):
            from bundle.figures import plot_froc

            with tempfile.TemporaryDirectory() as tmp:
                fpi = np.asarray(curve["fp_clusters_per_image"], float)
                sens = np.asarray(curve["cluster_sensitivity"], float)
                opi = int(np.argmin(np.abs(np.asarray(curve["threshold"]) - op)))
                png = os.path.join(tmp, "cluster_froc.png")
                plot_froc({"evaluation": (fpi, sens, opi)}, png, list(self.metrics.froc_fp_rates))
                client.log_artifact(run_id, png, "curves")
            fig = Figure(figsize=(6, 4.2))
            ax = fig.add_subplot(1, 1, 1)
            xr = np.maximum(np.asarray(curve["fp_marks_per_cm2"], float), 1e-3)
            ax.plot(xr, np.asarray(curve["object_tpr"], float), marker="o", ms=3)
            ax.set_xscale("log")
            ax.set_xlabel("false marks per cm^2 of breast")
            ax.set_ylabel("MC detection rate (TPR)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
            ax.set_title("object TPR vs false marks per cm^2 over thresholds", fontsize=9)
            fig.tight_layout()
            client.log_figure(run_id, fig, "curves/object_tpr_vs_fp_per_cm2.png")

        if self.objects:
            d = np.asarray([o["diameter_mm"] for o in self.objects], float)
            det = np.asarray([o["detected"] for o in self.objects], bool)
            sizes = np.unique(np.quantile(d, np.linspace(0.1, 1.0, 10)))
            rate = [float(det[d <= s].mean()) for s in sizes]
            fig = _rate_figure(sizes, rate, "MC diameter at most (mm)", f"MCs detected at threshold {op:g}",
                               f"detection vs MC size ({len(d)} MCs)")
            client.log_figure(run_id, fig, "curves/detection_vs_size.png")
            contrast = np.asarray([o["contrast"] for o in self.objects], float)
            ok = np.isfinite(contrast)
            if ok.sum() >= 2:
                edges = np.unique(np.quantile(contrast[ok], np.linspace(0, 1, self.density_bins + 1)))
                centres, rates = [], []
                for lo, hi in zip(edges[:-1], edges[1:]):
                    sel = ok & (contrast >= lo) & (contrast <= hi)
                    if sel.any():
                        centres.append(float(np.median(contrast[sel])))
                        rates.append(float(det[sel].mean()))
                fig = _rate_figure(centres, rates, "MC contrast: interior - exterior mean (normalised image), bin median",
                                   f"MCs detected at threshold {op:g}", "detection vs MC density contrast (quantile bins)")
                client.log_figure(run_id, fig, "curves/detection_vs_density.png")

        rows = list(self.metrics.rows)
        if rows:
            cols = list(rows[0].keys())
            client.log_table(run_id, {c: [r.get(c) for r in rows] for c in cols}, "tables/per_case.json")
        for key, name, title in (("fp", "by_false_marks", "cases with the most false marks"),
                                 ("missed", "by_missed_mcs", "cases with the most missed MCs")):
            fig = self._worst_panel(key, title)
            if fig is not None:
                client.log_figure(run_id, fig, f"worst/{name}.png")
