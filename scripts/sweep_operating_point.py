#!/usr/bin/env python
"""Choose the hole control's cluster rate and the refined mask's mark-size limit on VALIDATION views.

usage:
    python scripts/sweep_operating_point.py FOLDER [FOLDER ...] [--cache DIR]
        [--cluster 40 50 60 70 80 100] [--max-diameter 0.8 1.0 1.5] [--refined 0.6]
        [--candidate 0.5 0.3 0.2] [--grow 0.4 0.3] [--grow-segai 0.7 0.5] [--set KEY=JSON ...]

Every FOLDER holds images with their ``<stem>_label.nii.gz`` (an all-zero label = an MC-free
view), e.g. ``work_data/real/validation`` and the validation phantoms. Each case is read with the
bundle's preprocessing (labels resampled with it, nearest neighbour, onto the 0.07 mm working
grid), SegAI runs once, and the GenAI refinement runs once on the hole of the loosest cluster
rate; both are cached in ``--cache`` (a rerun only scores). For every cluster rate the refined map
is restricted to that rate's hole (its holes are nested in the loosest one's; the inpainter's
crops are local, so this stands in for a rerun), thresholded at ``--refined`` and, per
``--max-diameter``, cleared of larger marks. Printed per setting, on the working grid: false
marks and activation of the MC-free real views, MC objects >= 0.2 mm and clusters found, false
marks and pixel sensitivity of the injected views, and objects / pixel sensitivity of the
phantoms (folder names containing "phantom"). Official figures come from the main command and
``scripts/score_outputs.py`` on the native grid (docs/results.md, section 0).

``--candidate`` sweeps the hole control's candidate threshold (and its lowest threshold) as well;
the cached refinement then runs on the hole of the lowest candidate threshold and the loosest
cluster rate, and every other setting's hole is nested in it.

``--grow`` adds settings whose marks are grown into the connected hole pixels with a refined map
at or above the given lower threshold (:func:`bundle.clusters.grow_marks`, the pipeline's
``grow_threshold``; rows "r<value>"): the rim of each kept mark, and no new mark. ``--grow-segai``
does the same into SegAI's own map (``segai_grow_threshold``; rows "s<value>").

``--stages`` adds, per setting (its first ``--max-diameter``), where the missed MCs >= 0.2 mm are
lost (:func:`bundle.image_metrics.loss_stages`: SegAI's mask, the candidate threshold, the hole
control, the refined threshold, the size limit) and how many of the hole's marks that touch no MC the
refinement keeps (its false-positive filter, MC-free views included). ``--contrast`` adds the local contrast-to-noise
(:func:`bundle.image_metrics.local_contrast_to_noise`) of the found and the missed MCs, and the
99.9th / 99.99th percentile of the same map over each view's tissue away from any MC: an MC
below the tissue's own spots is one that no threshold on contrast can separate (it reads the
images again once and adds the values to the cache). ``--gallery PNG`` draws, for the first
setting, 2.3 mm crops of the false marks kept on the MC-free views beside injected MCs found.

``--set`` overrides entries of ``configs/inference.json`` before the pipeline is built (a JSON
value; a bare word is taken as a string), e.g. a candidate SegAI:
``--set ckpt_path=eval/train_segai_hn/model.pt --set network_def#norm=batch --set network_def#act=relu``.
The overrides and a hash of the SegAI and inpainter weights are part of the cache file names, so
each candidate (and each retrained model at the same path) has its own cache.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import pickle
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
S8 = np.ones((3, 3), bool)


def _cache_case(pipe, pre, img: Path, lab: Path, spacing: float, loosest: float, cand: float, out: Path) -> None:
    from bundle.falsealarm import FalseAlarmControl

    d = pre({"image": str(img), "label": str(lab)})
    x = np.asarray(d["image"][0])
    b = np.asarray(d["breast"][0]) > 0
    y = np.asarray(d["label"][0]) > 0
    prob = pipe.segai(x, b)
    hc = pipe.hole_control
    ctl = FalseAlarmControl(expected_false_marks=hc.expected_false_marks, cluster_false_marks=loosest,
                            candidate_threshold=cand, fit_ranks=hc.fit_ranks,
                            min_threshold=cand, max_threshold=hc.max_threshold, spacing_mm=spacing)
    mask = np.asarray(ctl(prob, b)["mask"])
    ref = pipe.refiner(x, prob * mask, b)
    hole = np.flatnonzero(np.asarray(ref["hole"]))
    rec = {"shape": y.shape, "truth": np.flatnonzero(y), "breast": np.packbits(b), "pidx": np.flatnonzero(prob >= 0.05),
           "hole": hole, "rp": np.asarray(ref["prob"], np.float32).ravel()[hole].astype(np.float16)}
    rec["pval"] = prob.ravel()[rec["pidx"]].astype(np.float16)
    _write(rec, out)


def _write(rec: dict, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(rec, fh)
    tmp.replace(out)


def _add_contrast(x: np.ndarray, rec: dict, out: Path) -> dict:
    """Add the local contrast-to-noise of image ``x`` at the truth pixels and the tissue's percentiles to ``rec``."""
    from bundle.image_metrics import local_contrast_to_noise

    cnr = local_contrast_to_noise(x)
    n = int(np.prod(rec["shape"]))
    breast = np.unpackbits(rec["breast"])[:n].astype(bool)
    truth = _dense(rec, rec["truth"])
    away = ~ndimage.binary_dilation(truth, S8, iterations=5).ravel()
    rec["cnr_truth"] = cnr.ravel()[rec["truth"]].astype(np.float16)
    rec["cnr_tissue"] = np.percentile(cnr.ravel()[breast & away], [99.9, 99.99]).astype(np.float32)
    _write(rec, out)
    return rec


def _crops(x: np.ndarray, img: Path, marks: np.ndarray, truth_labels: np.ndarray, rp: np.ndarray,
           prob: np.ndarray, false_only: bool, half: int = 16) -> list:
    """33 x 33 crops of image ``x`` (read from ``img``) around each mark (false marks, or marks on an MC)."""
    ml, nm = ndimage.label(marks, S8)
    out = []
    for i, sl in enumerate(ndimage.find_objects(ml)[:200]):
        comp = ml[sl] == i + 1
        if bool((truth_labels[sl][comp] > 0).any()) == false_only:
            continue
        r, c = (int((s_.start + s_.stop) // 2) for s_ in sl)
        r0, c0 = max(r - half, 0), max(c - half, 0)
        win = (slice(r0, r0 + 2 * half + 1), slice(c0, c0 + 2 * half + 1))
        view = img.name.split(".")[0].replace("cbis_sfm-", "").replace("_clean", "")
        cap = f"{view}\nr{rp[sl][comp].max():.2f} s{prob[sl][comp].max():.2f}"
        out.append((x[win], ml[win] == i + 1, cap))
    return out


def _dense(rec: dict, idx: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    a = np.zeros(int(np.prod(rec["shape"])), np.float32 if values is not None else bool)
    a[idx] = True if values is None else values.astype(np.float32)
    return a.reshape(rec["shape"])


def _truth(truth: np.ndarray, spacing: float) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, int]:
    from bundle.clusters import find_clusters

    tl, nt = ndimage.label(truth, S8)
    sizes = np.bincount(tl.ravel(), minlength=nt + 1)[1:]
    inc = 2 * np.sqrt(sizes * spacing * spacing / np.pi) >= 0.2 - 1e-9
    cents = np.array(ndimage.center_of_mass(truth, tl, range(1, nt + 1))).reshape(-1, 2) * spacing
    tcl = np.full(nt, -1)
    ncl = 0
    if inc.any():
        sub, ncl = find_clusters(cents[inc], 5.0, 3)
        tcl[inc] = sub
    return tl, nt, inc, tcl, ncl


def _score(pred: np.ndarray, truth: np.ndarray, breast: np.ndarray, t: tuple) -> dict:
    tl, nt, inc, tcl, ncl = t
    pred = pred & breast
    pl, npred = ndimage.label(pred, S8)
    hit = np.zeros(nt + 1, bool)
    hit[np.unique(tl[pred & (tl > 0)])] = True
    hit = hit[1:]
    fp = npred - np.unique(pl[(pl > 0) & (tl > 0)]).size
    det_cl = {int(tcl[i]) for i in np.flatnonzero(hit & inc) if tcl[i] >= 0}
    return {"fp": fp, "obj": int(inc.sum()), "det": int((hit & inc).sum()), "cl": ncl, "cldet": len(det_cl),
            "act": pred.sum() / max(breast.sum(), 1), "psens": (pred & truth).sum() / max(truth.sum(), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--cache", type=Path, default=ROOT / "eval" / "sweep_cache")
    ap.add_argument("--cluster", nargs="+", type=float, default=[40, 50, 60, 70, 80, 100])
    ap.add_argument("--max-diameter", nargs="+", type=float, default=[0.8, 1.0, 1.5])
    ap.add_argument("--refined", type=float, default=0.6)
    ap.add_argument("--candidate", nargs="+", type=float, default=None,
                    help="hole control candidate thresholds (also its lowest threshold); default: the config's")
    ap.add_argument("--grow", nargs="+", type=float, default=[],
                    help="also score marks grown into the hole pixels with refined map >= each value")
    ap.add_argument("--grow-segai", nargs="+", type=float, default=[],
                    help="also score marks grown into the pixels with SegAI probability >= each value")
    ap.add_argument("--stages", action="store_true", help="print where the missed MCs are lost, per setting")
    ap.add_argument("--contrast", action="store_true",
                    help="print the local contrast-to-noise of found and missed MCs and of the tissue")
    ap.add_argument("--gallery", type=Path, default=None, metavar="PNG",
                    help="write crops of the false marks kept on the MC-free views and of found injected MCs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                    help="override an entry of configs/inference.json (repeatable)")
    args = ap.parse_args()
    import hashlib
    import json

    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    sys.path.insert(0, str(ROOT))
    import contextlib

    from monai.bundle import ConfigParser
    from monai.transforms import Compose
    from tqdm import tqdm

    from bundle.clusters import drop_large_marks, grow_marks
    from bundle.data import BreastMaskd, LoadMammogramd, NormalizeMammogramd, OrientBreastd, ResampleToSpacingd
    from bundle.falsealarm import FalseAlarmControl
    from bundle.image_metrics import LOSS_STAGES, loss_stages
    from bundle.refine_maps import _dilate_disk

    with contextlib.chdir(ROOT):
        parser = ConfigParser()
        parser.read_config("configs/inference.json")
        parser["bundle_root"] = str(ROOT)
        for key, value in overrides.items():
            parser[key] = value
        pipe = parser.get_parsed_content("pipeline")
        spacing = float(parser.get_parsed_content("working_spacing"))
        # the cache is keyed by the overrides AND the bytes of the weights, so a retrained SegAI or
        # inpainter at the same path never reuses another model's cached maps
        weights = {k: hashlib.sha1(Path(parser.get_parsed_content(k)).read_bytes()).hexdigest()
                   for k in ("ckpt_path", "inpainter_ckpt_path")}
    tag = "__" + hashlib.sha1(json.dumps([overrides, weights], sort_keys=True).encode()).hexdigest()[:8]
    pre = Compose([LoadMammogramd(keys=["image", "label"]), OrientBreastd(keys=["image", "label"]),
                   ResampleToSpacingd(keys=["image", "label"], spacing=spacing, mode=["bilinear", "nearest"]),
                   BreastMaskd(image_key="image", out_key="breast"), NormalizeMammogramd(keys="image", breast_key="breast")])
    loosest = max(args.cluster)
    hc = pipe.hole_control
    cand_values = args.candidate or [hc.candidate_threshold]
    loose_cand = min(cand_values)
    ctag = f"_k{loose_cand:g}"
    args.cache.mkdir(parents=True, exist_ok=True)
    cases = []
    for folder in args.folders:
        for img in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith("_label.nii.gz")):
            lab = folder / f"{img.name.split('.')[0]}_label.nii.gz"
            if lab.exists():
                cases.append((folder, img, lab))
    for folder, img, lab in tqdm(cases, desc="SegAI + refinement", unit="case"):
        f = args.cache / f"{folder.name}__{img.name.split('.')[0]}__c{loosest:g}{ctag}{tag}.pkl"
        if not f.exists():
            _cache_case(pipe, pre, img, lab, spacing, loosest, loose_cand, f)
    agg: dict = {}
    stages: dict = {}
    gallery: dict = {"clean": [], "inj": []}
    first_key = (cand_values[0], args.cluster[0], "-", f"{args.max_diameter[0]:g} mm")
    contrast: dict = {}
    for folder, img, lab in tqdm(cases, desc="scoring", unit="case"):
        f = args.cache / f"{folder.name}__{img.name.split('.')[0]}__c{loosest:g}{ctag}{tag}.pkl"
        rec = pickle.load(open(f, "rb"))
        # the preprocessed image, read at most once per case (only --contrast and --gallery need it)
        image = functools.cache(lambda img=img, lab=lab: np.asarray(pre({"image": str(img), "label": str(lab)})["image"][0], np.float32))
        if args.contrast and "cnr_truth" not in rec:
            rec = _add_contrast(image(), rec, f)
        n = int(np.prod(rec["shape"]))
        truth = _dense(rec, rec["truth"])
        breast = np.unpackbits(rec["breast"])[:n].astype(bool).reshape(rec["shape"])
        t = _truth(truth, spacing)
        prob = _dense(rec, rec["pidx"], rec["pval"])
        rp_loose = _dense(rec, rec["hole"], rec["rp"])
        grp = "phantom" if "phantom" in folder.name else ("clean" if t[1] == 0 else "inj")
        obj_cnr = None
        if args.contrast:
            ids = np.arange(1, t[1] + 1)
            cnr = _dense(rec, rec["truth"], rec["cnr_truth"])
            obj_cnr = ndimage.maximum(cnr, t[0], ids)[t[2]] if t[1] else np.zeros(0)
            contrast.setdefault("tissue", {}).setdefault(grp, []).append(rec["cnr_tissue"])
        for cand, c in [(k, r) for k in cand_values for r in args.cluster]:
            ctl = FalseAlarmControl(expected_false_marks=hc.expected_false_marks, cluster_false_marks=c,
                                    candidate_threshold=cand, fit_ranks=hc.fit_ranks,
                                    min_threshold=cand, max_threshold=hc.max_threshold,
                                    spacing_mm=spacing)
            hole = _dilate_disk(np.asarray(ctl(prob, breast)["mask"]), 1)
            rp = rp_loose * hole
            core = rp >= args.refined
            variants = [("-", None)] + [(f"r{g:g}", rp >= g) for g in args.grow]
            variants += [(f"s{g:g}", prob >= g) for g in args.grow_segai]
            for gtag, support in variants:
                pred = core if support is None else grow_marks(core, support)
                agg.setdefault((cand, c, gtag, "none"), {}).setdefault(grp, []).append(_score(pred, truth, breast, t))
                for j, dmax in enumerate(args.max_diameter):
                    kept = drop_large_marks(pred, dmax, spacing)
                    key = (cand, c, gtag, f"{dmax:g} mm")
                    agg.setdefault(key, {}).setdefault(grp, []).append(_score(kept, truth, breast, t))
                    if j or not (args.stages or args.contrast or args.gallery):
                        continue
                    if args.stages:
                        tot_ = stages.setdefault(key, {}).setdefault(grp, dict.fromkeys(LOSS_STAGES + ("false", "false_kept"), 0))
                        if grp != "clean":
                            counts = loss_stages(truth, kept & breast, prob, hole, rp, candidate_threshold=cand,
                                                 refined_threshold=args.refined, spacing_mm=spacing)
                            for k_, v_ in counts.items():
                                tot_[k_] += v_
                        # the hole's marks that touch no MC, and how many of them the refinement keeps
                        hl, nh = ndimage.label(hole & breast, S8)
                        if nh:
                            ids_ = np.arange(1, nh + 1)
                            false_ = ndimage.maximum((t[0] > 0).astype(np.uint8), hl, ids_) == 0
                            kept_ = ndimage.maximum((kept & breast).astype(np.uint8), hl, ids_) > 0
                            tot_["false"] += int(false_.sum())
                            tot_["false_kept"] += int((false_ & kept_).sum())
                            peaks = ndimage.maximum(rp, hl, ids_)
                            tot_.setdefault("peak_false", []).extend(peaks[false_].tolist())
                            tot_.setdefault("peak_mc", []).extend(peaks[~false_].tolist())
                    if args.gallery and key == first_key and (grp == "clean" or (grp == "inj" and len(gallery[grp]) < 10 and "inj0" in img.name)):
                        crops = _crops(image(), img, kept & breast, t[0], rp, prob, grp == "clean")
                        gallery[grp].extend(crops if grp == "clean" else crops[:2])
                    if grp == "clean":
                        continue
                    if obj_cnr is not None and obj_cnr.size:
                        hit = np.zeros(t[1] + 1, bool)
                        hit[np.unique(t[0][kept & breast & (t[0] > 0)])] = True
                        missed = ~hit[1:][t[2]]
                        pair = contrast.setdefault(key, {}).setdefault(grp, ([], [], [], []))
                        pair[0].extend(obj_cnr[~missed].tolist())
                        pair[1].extend(obj_cnr[missed].tolist())
                        pair[2].extend((obj_cnr[missed] < rec["cnr_tissue"][1]).tolist())
                        sizes = np.bincount(t[0].ravel(), minlength=t[1] + 1)[1:][t[2]]
                        pair[3].extend(sizes[missed].tolist())
    print(f"{len(cases)} cases; refined >= {args.refined}; working grid {spacing} mm")
    print("candidate | cluster rate | grow | max mark | MC-free: false marks, activation | injected: MCs >= 0.2 mm, clusters, "
          "false marks, pixel sens. | phantoms: MCs >= 0.2 mm, pixel sens.")
    for (cand, c, gt, dm), g in sorted(agg.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        line = f"{cand:9g} | {c:12g} | {gt:5s} | {dm:8s} |"
        cl, inj, ph = g.get("clean", []), g.get("inj", []), g.get("phantom", [])
        tot = lambda lst, k: sum(x[k] for x in lst)  # noqa: E731
        if cl:
            line += f" {np.mean([x['fp'] for x in cl]):5.1f}, {100 * np.mean([x['act'] for x in cl]):.4f} % |"
        if inj:
            line += (f" {tot(inj, 'det')}/{tot(inj, 'obj')} = {100 * tot(inj, 'det') / max(tot(inj, 'obj'), 1):.1f} %,"
                     f" {tot(inj, 'cldet')}/{tot(inj, 'cl')}, {np.mean([x['fp'] for x in inj]):5.1f},"
                     f" {np.mean([x['psens'] for x in inj]):.3f} |")
        if ph:
            line += f" {tot(ph, 'det')}/{tot(ph, 'obj')} = {100 * tot(ph, 'det') / max(tot(ph, 'obj'), 1):.1f} %, {np.mean([x['psens'] for x in ph]):.3f}"
        print(line)
    if args.stages:
        print(f"\nwhere the MCs >= 0.2 mm are lost (first max mark; SegAI mask 0.05, refined {args.refined}):")
        print("candidate | cluster rate | grow | group | " + " | ".join(LOSS_STAGES) + " | hole marks on no MC: kept by the refinement")
        for (cand, c, gt, dm), g in sorted(stages.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
            for grp, counts in sorted(g.items()):
                mcs = " | ".join("-" if grp == "clean" else str(counts[k]) for k in LOSS_STAGES)
                print(f"{cand:9g} | {c:12g} | {gt:5s} | {grp:7s} | {mcs} | {counts['false_kept']}/{counts['false']}")
        print("median refined peak of the hole's marks on no MC / on an MC:")
        for (cand, c, gt, dm), g in sorted(stages.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
            for grp, counts in sorted(g.items()):
                med = lambda v: f"{np.median(v):.3f} ({len(v)})" if len(v) else "-"  # noqa: E731
                print(f"  {cand:g} | {c:g} | {gt} | {grp}: {med(counts.get('peak_false', []))} / {med(counts.get('peak_mc', []))}")
    if args.gallery:
        from bundle.figures import crop_gallery

        by_view: dict = {}  # the false marks of the MC-free views, taken in turn from each view
        for crop in gallery["clean"]:
            by_view.setdefault(crop[2].split("\n")[0], []).append(crop)
        mixed = [crop for turn in itertools.zip_longest(*by_view.values()) for crop in turn if crop is not None]
        rows = {"MC-free views:\nfalse marks kept": mixed[:10],
                "injected MCs found": gallery["inj"][:10]}
        crop_gallery(rows, args.gallery, per_row=10, title=(
            f"candidates {first_key[0]:g}, cluster rate {first_key[1]:g}, refined >= {args.refined:g}: "
            "2.3 mm crops on the working grid, red = the refined mark; r = refined peak, s = SegAI peak"))
        print(f"\nwrote {args.gallery}")
    if args.contrast:
        print("\nlocal contrast-to-noise of the MCs >= 0.2 mm (median [5th-95th percentile]); tissue away from MCs:")
        for grp, q in sorted(contrast.get("tissue", {}).items()):
            q = np.asarray(q)
            print(f"  {grp}: tissue 99.9th percentile {np.median(q[:, 0]):.2f}, 99.99th {np.median(q[:, 1]):.2f} (median over views)")
        fmt = lambda v: f"{np.median(v):.2f} [{np.percentile(v, 5):.2f}-{np.percentile(v, 95):.2f}]" if len(v) else "-"  # noqa: E731
        for key, g in sorted((k, v) for k, v in contrast.items() if k != "tissue"):
            for grp, (fd, ms, below, sizes) in sorted(g.items()):
                extra = f"; {sum(below)} of them below their view's tissue 99.99th percentile, sizes {min(sizes)}-{max(sizes)} px (median {np.median(sizes):g})" if ms else ""
                print(f"  {key[0]:g} | {key[1]:g} | {key[2]} | {grp}: found {len(fd)}: {fmt(fd)}; missed {len(ms)}: {fmt(ms)}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
