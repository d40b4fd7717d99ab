#!/usr/bin/env python
"""Choose the false-alarm operating point on validation views (issue 11).

usage:
    python scripts/tune_false_alarms.py INPUT_DIR OUTPUT_DIR [--map refined_prob] \
        [--expected 2 5 10 20] [--candidate 0.05 0.1] [--fixed 0.5 0.8 0.95]

INPUT_DIR holds the images and their ``<stem>_label.nii.gz`` (an empty label = an MC-free view);
OUTPUT_DIR is the main command's output for them (``<stem>/<stem>_<map>.nii.gz``). For every
setting of :class:`bundle.falsealarm.FalseAlarmControl` (and, for comparison, fixed global
thresholds) the script prints, over the views: false marks per image (components touching no
truth MC), false-positive clusters per image, activation of the MC-free views, MC objects of
>= ``--min-diameter-mm`` detected and truth clusters detected (>= 3 MCs linked at 5 mm; a
predicted cluster touching one of its MCs). Use it on validation views only; report held-out
views with ``scripts/score_outputs.py``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> np.ndarray:
    return np.squeeze(np.asarray(nib.load(str(path)).dataobj))


def _case(input_dir: Path, output_dir: Path, stem: str, map_key: str, min_d: float, cluster_min_d: float = 0.0) -> dict | None:
    from bundle.clusters import find_clusters
    from bundle.data import BreastMaskd, LoadMammogramd, OrientBreastd, RestoreGeometryd

    images = [p for p in input_dir.glob(stem + ".*") if not p.name.endswith("_label.nii.gz")]
    pred_path = output_dir / stem / f"{stem}_{map_key}.nii.gz"
    if not images or not pred_path.exists():
        print(f"{stem}: missing input or {pred_path}", file=sys.stderr)
        return None
    truth = _load(input_dir / f"{stem}_label.nii.gz") > 0
    prob = _load(pred_path).astype(np.float32)
    d = LoadMammogramd(keys="image")({"image": str(images[0])})
    spacing = float(d["image"].meta["spacing"][0])
    d = RestoreGeometryd(keys="breast", mode="nearest")(BreastMaskd()(OrientBreastd(keys="image")(d)))
    breast = np.asarray(d["breast"][0]) > 0
    tl, n_t = ndimage.label(truth, structure=np.ones((3, 3), bool))
    sizes = np.bincount(tl.ravel(), minlength=n_t + 1)[1:]
    diam = 2.0 * np.sqrt(sizes * spacing * spacing / np.pi)
    cents = np.array(ndimage.center_of_mass(truth, tl, range(1, n_t + 1))).reshape(-1, 2) * spacing
    member = diam >= cluster_min_d * (1 - 1e-9)
    tcl = np.full(n_t, -1, dtype=int)
    sub, n_cl = find_clusters(cents[member], 5.0, 3) if member.any() else (np.zeros(0, int), 0)
    tcl[member] = sub
    return {"stem": stem, "prob": prob, "truth_labels": tl, "n_truth": n_t, "included": diam >= min_d * (1 - 1e-9),
            "truth_cluster": tcl, "n_truth_clusters": n_cl, "breast": breast, "spacing": spacing}


def _score(case: dict, labels: np.ndarray, keep_mask: np.ndarray) -> dict:
    """Counts of one view when the candidates of ``keep_mask`` are kept."""
    from bundle.clusters import find_clusters

    keep = np.flatnonzero(keep_mask) + 1
    n_t = case["n_truth"]
    tl = case["truth_labels"]
    sel = (labels > 0) & (tl > 0)
    pairs = np.unique(labels[sel].astype(np.int64) * (n_t + 1) + tl[sel]) if sel.any() else np.zeros(0, np.int64)
    pc, tt = pairs // (n_t + 1), pairs % (n_t + 1)
    kept = np.isin(pc, keep)
    pc, tt = pc[kept], tt[kept]
    tp_marks = np.unique(pc)
    hit = np.zeros(n_t + 1, bool)
    hit[tt] = True
    hit = hit[1:]
    kept_px = int(np.isin(labels, keep).sum()) if keep.size else 0
    out = {"marks": int(keep.size), "fp_marks": int(keep.size - tp_marks.size), "kept_px": kept_px,
           "obj": int(case["included"].sum()), "obj_det": int((hit & case["included"]).sum()),
           "cl": case["n_truth_clusters"], "cl_det": 0, "fp_cl": 0}
    if keep.size:
        c = np.array(ndimage.center_of_mass(labels > 0, labels, keep)).reshape(-1, 2) * case["spacing"]
        pcl, k = find_clusters(c, 5.0, 3)
        if k:
            idx = {int(m): i for i, m in enumerate(keep)}
            cl_hits_truth = np.zeros(k, bool)
            det = set()
            for p, t_obj in zip(pc, tt):
                ci = pcl[idx[int(p)]]
                if ci >= 0:
                    cl_hits_truth[ci] = True
                    if case["truth_cluster"][t_obj - 1] >= 0:
                        det.add(int(case["truth_cluster"][t_obj - 1]))
            out["cl_det"] = len(det)
            out["fp_cl"] = int(k - cl_hits_truth.sum())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input_dir", type=Path)
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--map", default="refined_prob", help="map to threshold: refined_prob or prob")
    ap.add_argument("--expected", type=float, nargs="*", default=[2, 5, 10, 20], help="expected false marks per image")
    ap.add_argument("--candidate", type=float, nargs="*", default=[0.1], help="candidate thresholds")
    ap.add_argument("--fit-ranks", type=int, nargs="*", default=[30, 300], help="pairs: first last ...")
    ap.add_argument("--min-threshold", type=float, nargs="*", default=[0.5])
    ap.add_argument("--cluster-expected", type=float, nargs="*", default=[0], help="looser rate for clustered candidates (0: off)")
    ap.add_argument("--fixed", type=float, nargs="*", default=[0.5, 0.8, 0.9, 0.95, 0.99], help="global thresholds to compare")
    ap.add_argument("--min-diameter-mm", type=float, default=0.2)
    ap.add_argument("--cluster-min-diameter-mm", type=float, default=0.2,
                    help="smallest truth MC that counts as a member of a truth cluster (0: every MC)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bundle.falsealarm import FalseAlarmControl, candidate_scores

    stems = sorted(p.name[: -len("_label.nii.gz")] for p in args.input_dir.glob("*_label.nii.gz"))
    cases = [c for c in (_case(args.input_dir, args.output_dir, s, args.map, args.min_diameter_mm, args.cluster_min_diameter_mm) for s in stems) if c]
    if not cases:
        print("no cases")
        return 1
    fit_pairs = list(zip(args.fit_ranks[::2], args.fit_ranks[1::2]))
    rows = []
    for cand in args.candidate:
        cand_data = [candidate_scores(c["prob"], cand, c["breast"]) for c in cases]
        settings = [("fixed", t, None, None, 0) for t in args.fixed if t >= cand]
        settings += [("control", e, fr, mt, ce) for e, fr, mt, ce in
                     itertools.product(args.expected, fit_pairs, args.min_threshold, args.cluster_expected)
                     if mt >= cand and (ce == 0 or ce > e)]
        for kind, v, fr, mt, ce in settings:
            res = []
            ctl = None if kind == "fixed" else FalseAlarmControl(
                v, cand, fr, mt, cluster_false_marks=ce or None)
            for c, (lab, sc) in zip(cases, cand_data):
                if ctl is None:
                    keep, t = sc >= v, v
                else:
                    ctl.spacing_mm = c["spacing"]  # the maps are on each view's own grid here
                    keep, t, _ = ctl.select(lab, sc)
                r = _score(c, lab, keep)
                r.update(stem=c["stem"], t=t, clean=c["n_truth"] == 0, breast_px=int(c["breast"].sum()))
                res.append(r)
            clean = [r for r in res if r["clean"]]
            inj = [r for r in res if not r["clean"]]
            name = f"fixed t={v:g}" if kind == "fixed" else f"control E={v:g} fit={fr} min={mt:g} cl={ce:g}"
            row = {
                "setting": f"cand {cand:g} {name}",
                "fp_marks_all": np.mean([r["fp_marks"] for r in res]),
                "fp_marks_clean": np.mean([r["fp_marks"] for r in clean]) if clean else float("nan"),
                "fp_clusters_all": np.mean([r["fp_cl"] for r in res]),
                "act_clean_pct": 100 * np.mean([r["kept_px"] / max(r["breast_px"], 1) for r in clean]) if clean else float("nan"),
                "obj_det_pct": 100 * sum(r["obj_det"] for r in inj) / max(sum(r["obj"] for r in inj), 1),
                "cl_sens_pct": 100 * sum(r["cl_det"] for r in inj) / max(sum(r["cl"] for r in inj), 1),
                "t_range": f"{min(r['t'] for r in res):.3f}-{max(r['t'] for r in res):.3f}",
            }
            rows.append(row)
            print(" | ".join(f"{k}={v:.4f}" if k.startswith("act") else (f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}")
                             for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
