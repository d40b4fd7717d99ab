#!/usr/bin/env python
"""Score an inference output folder against truth masks on the source pixel grid.

usage:
    python scripts/score_outputs.py INPUT_DIR OUTPUT_DIR [--suffix mask] [--min-diameter-mm 0.2]

For every ``<stem>_label.nii.gz`` in INPUT_DIR (as written by ``scripts/make_demo_data.py``)
it reads ``OUTPUT_DIR/<stem>/<stem>_<suffix>.nii.gz`` and reports per case and pooled: MC
objects (connected components of the truth) of at least ``--min-diameter-mm`` detected (any
predicted-positive pixel inside), pixel sensitivity, PPV, Dice and the activation rate beside
the true one (breast = the bundle's breast mask of the input). Exit code 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input_dir", type=Path)
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--suffix", default="mask", help="which output mask to score: mask or refined_mask")
    ap.add_argument("--min-diameter-mm", type=float, default=0.2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bundle.data import BreastMaskd, LoadMammogramd, OrientBreastd, RestoreGeometryd
    from bundle.metrics import object_stats, pixel_stats

    labels = sorted(args.input_dir.glob("*_label.nii.gz"))
    if not labels:
        print(f"{args.input_dir}: no *_label.nii.gz files")
        return 1
    rows = []
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
        spacing = float(d["image"].meta["spacing"][0])
        d = BreastMaskd()(OrientBreastd(keys="image")(d))
        d = RestoreGeometryd(keys="breast", mode="nearest")(d)
        breast = np.asarray(d["breast"][0]) > 0
        ps = pixel_stats(pred, truth, breast)
        ob = object_stats(pred, truth, spacing, min_diameter_mm=args.min_diameter_mm)
        rows.append((stem, ob["n_detected"], ob["n_objects"], ps))
        print(f"{stem}: objects >= {args.min_diameter_mm} mm detected {ob['n_detected']}/{ob['n_objects']}, "
              f"sensitivity {ps['sensitivity']:.3f}, PPV {ps['ppv']:.3f}, Dice {ps['dice']:.3f}, "
              f"activation {100 * ps['activation_rate']:.4f} % (true {100 * ps['true_activation_rate']:.4f} %)")
    if not rows:
        return 1
    det, n = sum(r[1] for r in rows), sum(r[2] for r in rows)
    mean = {k: float(np.nanmean([r[3][k] for r in rows])) for k in ("sensitivity", "ppv", "dice", "activation_rate", "true_activation_rate")}
    print(f"ALL {len(rows)} cases: objects >= {args.min_diameter_mm} mm detected {det}/{n} = {100 * det / max(n, 1):.1f} %; "
          f"mean sensitivity {mean['sensitivity']:.3f}, PPV {mean['ppv']:.3f}, Dice {mean['dice']:.3f}, "
          f"activation {100 * mean['activation_rate']:.4f} % vs true {100 * mean['true_activation_rate']:.4f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
