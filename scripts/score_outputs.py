#!/usr/bin/env python
"""Score an inference output folder against truth masks on the source pixel grid.

usage:
    python scripts/score_outputs.py INPUT_DIR OUTPUT_DIR [--suffix mask] [--min-diameter-mm 0.2]
        [--link-mm 5] [--min-cluster 3] [--fp-per-cm2 0.1 0.5 1.0] [--no-sweep] [--csv PATH]
        [--curve-csv PATH]

For every ``<stem>_label.nii.gz`` in INPUT_DIR (as written by ``scripts/make_demo_data.py``)
it reads ``OUTPUT_DIR/<stem>/<stem>_<suffix>.nii.gz`` and reports per case and pooled: MC
objects (connected components of the truth) of at least ``--min-diameter-mm`` detected (any
predicted-positive pixel inside), pixel sensitivity, PPV, Dice and the activation rate beside
the true one (breast = the bundle's breast mask of the input), and the reader-facing detection
metrics of ``bundle.metrics`` (``docs/metrics.md``, "Detection metrics"):

- false marks: predicted components (8-connectivity) touching no truth pixel, per image and per
  cm^2 of breast (every mark is false on an image without MCs);
- false-positive clusters: clusters of >= ``--min-cluster`` marks whose centres lie within
  ``--link-mm`` of a neighbour (single linkage) with no mark touching a truth MC;
- cluster sensitivity: truth clusters (same definition on the truth objects) hit by a predicted
  cluster, pooled as detected / total;
- object IoU: IoU of each truth object with the predicted components overlapping it, mean over all
  truth objects (missed = 0) and over the detected ones.

When every case also has the probability map (``<stem>_prob.nii.gz`` for ``--suffix mask``,
``<stem>_refined_prob.nii.gz`` for ``refined_mask``), the map is swept over probability thresholds
(``bundle.metrics.DEFAULT_SWEEP_THRESHOLDS``) and the pooled cluster FROC (mean cluster sensitivity
at 0.25, 0.5, 1, 2, 4 false-positive clusters per image) and the object TPR (objects of at least
``--min-diameter-mm``) at ``--fp-per-cm2`` false marks per cm^2 of breast (HDoGReg's operating
points) are printed. The sweep thresholds the map itself, so its points need not contain the
saved mask when the mask was made otherwise (e.g. a per-image false-alarm control).
``--csv`` writes the per-case table, ``--curve-csv`` the pooled sweep. Exit code 0 (1 when nothing
could be scored).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input_dir", type=Path)
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--suffix", default="mask", help="which output mask to score: mask or refined_mask")
    ap.add_argument("--min-diameter-mm", type=float, default=0.2)
    ap.add_argument("--link-mm", type=float, default=5.0, help="cluster linking distance between mark centres")
    ap.add_argument("--min-cluster", type=int, default=3, help="smallest number of marks of a cluster")
    ap.add_argument("--cluster-min-diameter-mm", type=float, default=0.0,
                    help="smallest truth MC that counts as a member of a truth cluster (0: every MC)")
    ap.add_argument("--fp-per-cm2", type=float, nargs="+", default=[0.1, 0.5, 1.0],
                    help="false marks per cm^2 of breast at which the swept object TPR is reported")
    ap.add_argument("--no-sweep", action="store_true", help="do not sweep the probability maps")
    ap.add_argument("--csv", type=Path, default=None, help="write the per-case table here")
    ap.add_argument("--curve-csv", type=Path, default=None, help="write the pooled threshold sweep here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bundle.data import BreastMaskd, LoadMammogramd, OrientBreastd, RestoreGeometryd
    from bundle.metrics import (
        CURVE_COLUMNS,
        DEFAULT_FROC_FP_RATES,
        DEFAULT_SWEEP_THRESHOLDS,
        aggregate,
        cluster_stats,
        curve_summary,
        detection_curve,
        object_iou,
        object_stats,
        pixel_stats,
        pool_detection_curves,
    )
    from bundle.reports import write_csv_atomic

    labels = sorted(args.input_dir.glob("*_label.nii.gz"))
    if not labels:
        print(f"{args.input_dir}: no *_label.nii.gz files")
        return 1
    prob_suffix = args.suffix[: -len("mask")] + "prob" if args.suffix.endswith("mask") else None
    sweep = not args.no_sweep and prob_suffix is not None
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    missing_prob: list[str] = []
    for lab_path in labels:
        stem = lab_path.name[: -len("_label.nii.gz")]
        images = [p for p in args.input_dir.glob(stem + ".*") if not p.name.endswith("_label.nii.gz")]
        pred_path = args.output_dir / stem / f"{stem}_{args.suffix}.nii.gz"
        if not images or not pred_path.exists():
            print(f"{stem}: missing input image or {pred_path.name}")
            continue
        truth = np.squeeze(np.asarray(nib.load(str(lab_path)).dataobj)) > 0
        pred = np.squeeze(np.asarray(nib.load(str(pred_path)).dataobj)) > 0
        d = LoadMammogramd(keys="image")({"image": str(images[0])})
        sp = [float(x) for x in np.atleast_1d(np.asarray(d["image"].meta["spacing"], dtype=float))[:2]]
        spacing = (sp[0], sp[-1])
        d = BreastMaskd()(OrientBreastd(keys="image")(d))
        d = RestoreGeometryd(keys="breast", mode="nearest")(d)
        breast = np.asarray(d["breast"][0]) > 0
        ps = pixel_stats(pred, truth, breast)
        ob = object_stats(pred, truth, spacing, min_diameter_mm=args.min_diameter_mm)
        iou = object_iou(pred, truth)
        cl = cluster_stats(pred, truth, spacing, link_mm=args.link_mm, min_count=args.min_cluster,
                           member_min_diameter_mm=args.cluster_min_diameter_mm)
        area = float(np.count_nonzero(breast)) * spacing[0] * spacing[1] / 100.0
        row = {
            "case": stem, **{k: v for k, v in ps.items()},
            **{k: v for k, v in ob.items() if k != "objects"},
            "n_detected_all": iou["n_detected"], "object_iou": iou["object_iou"],
            "object_iou_detected": iou["object_iou_detected"], **cl,
            "breast_area_cm2": area, "fp_marks_per_cm2": ob["n_fp_objects"] / area if area > 0 else math.nan,
        }
        rows.append(row)
        print(f"{stem}: objects >= {args.min_diameter_mm} mm detected {ob['n_detected']}/{ob['n_objects']}, "
              f"sensitivity {ps['sensitivity']:.3f}, PPV {ps['ppv']:.3f}, Dice {ps['dice']:.3f}, "
              f"activation {100 * ps['activation_rate']:.4f} % (true {100 * ps['true_activation_rate']:.4f} %); "
              f"false marks {ob['n_fp_objects']} ({_f(row['fp_marks_per_cm2'], '.2f')}/cm^2), "
              f"FP clusters {cl['n_fp_clusters']}, truth clusters detected "
              f"{cl['n_detected_clusters']}/{cl['n_truth_clusters']}, object IoU {_f(iou['object_iou'])} "
              f"(detected {_f(iou['object_iou_detected'])})")
        if sweep:
            prob_path = args.output_dir / stem / f"{stem}_{prob_suffix}.nii.gz"
            if not prob_path.exists():
                missing_prob.append(stem)
                continue
            prob = np.squeeze(np.asarray(nib.load(str(prob_path)).dataobj, dtype=np.float32))
            curves.append(detection_curve(
                prob, truth, spacing, DEFAULT_SWEEP_THRESHOLDS, breast, min_diameter_mm=args.min_diameter_mm,
                link_mm=args.link_mm, min_count=args.min_cluster,
            ))
    if not rows:
        return 1
    det, n = sum(r["n_detected"] for r in rows), sum(r["n_objects"] for r in rows)
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in ("sensitivity", "ppv", "dice", "activation_rate", "true_activation_rate")}
    print(f"ALL {len(rows)} cases: objects >= {args.min_diameter_mm} mm detected {det}/{n} = {100 * det / max(n, 1):.1f} %; "
          f"mean sensitivity {mean['sensitivity']:.3f}, PPV {mean['ppv']:.3f}, Dice {mean['dice']:.3f}, "
          f"activation {100 * mean['activation_rate']:.4f} % vs true {100 * mean['true_activation_rate']:.4f} %")
    agg = aggregate(rows)
    normal = [r for r in rows if r["n_objects_all"] == 0]
    n_tc, n_dc = sum(r["n_truth_clusters"] for r in rows), sum(r["n_detected_clusters"] for r in rows)
    normal_txt = ""
    if normal:
        plural = "" if len(normal) == 1 else "s"
        normal_txt = (f" ({len(normal)} image{plural} without MCs: {np.mean([r['n_fp_objects'] for r in normal]):.2f} "
                      f"false marks, {np.mean([r['n_fp_clusters'] for r in normal]):.2f} FP clusters per image)")
    print(f"ALL {len(rows)} cases: false marks per image {agg['n_fp_objects']:.2f} "
          f"({_f(agg.get('fp_marks_per_cm2_pooled'), '.3f')} per cm^2 of breast), FP clusters per image "
          f"{agg['n_fp_clusters']:.2f}{normal_txt}; cluster sensitivity {n_dc}/{n_tc} = "
          f"{_f(agg.get('cluster_sensitivity_pooled'))}; object IoU {_f(agg.get('object_iou_pooled'))} "
          f"(detected {_f(agg.get('object_iou_detected_pooled'))})")
    if args.csv is not None:
        write_csv_atomic(rows, args.csv)
        print(f"per-case table: {args.csv}")
    if sweep and missing_prob:
        print(f"sweep skipped: no {prob_suffix} map for {', '.join(missing_prob)}")
    elif sweep and curves:
        pooled = pool_detection_curves(curves)
        cs = curve_summary(pooled, DEFAULT_FROC_FP_RATES, args.fp_per_cm2)
        froc = ", ".join(f"{f:g}: {_f(cs[f'froc_sens_at_{f:g}'])}" for f in DEFAULT_FROC_FP_RATES)
        tpr = ", ".join(f"{r:g}: {_f(cs[f'tpr_at_{r:g}_fp_per_cm2'])}" for r in args.fp_per_cm2)
        print(f"ALL {len(curves)} cases, {prob_suffix} swept over {len(DEFAULT_SWEEP_THRESHOLDS)} thresholds: "
              f"cluster FROC score {_f(cs['froc_score'])} (sensitivity at FP clusters per image {froc}); "
              f"TPR of objects >= {args.min_diameter_mm} mm at false marks per cm^2 {tpr}")
        if args.curve_csv is not None:
            table = [{k: float(pooled[k][i]) for k in CURVE_COLUMNS} for i in range(len(pooled["threshold"]))]
            write_csv_atomic(table, args.curve_csv, columns=CURVE_COLUMNS)
            print(f"pooled sweep: {args.curve_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
