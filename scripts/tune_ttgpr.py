#!/usr/bin/env python
"""Measure TT-GPR's gain over its initializer, and its cost, on VALIDATION views (issue 15).

usage:
    python scripts/tune_ttgpr.py [FOLDER] [--cases-per-view 3] [--window 512]
        [--variant NAME KEY=JSON [KEY=JSON ...]] ... [--json FILE]

FOLDER (default ``work_data/real/validation``) holds images with their ``<stem>_label.nii.gz``.
For each view the first ``--cases-per-view`` cases with MCs are read with the bundle's
preprocessing (labels resampled nearest-neighbour onto the working grid), MC-GenRef's
initializer runs once on the whole image, and ``--window`` px windows are cut around every
group of MCs (groups whose centres lie within half a window; one window per group). Each
variant's TT-GPR (``configs/inference_mcgenref.json#ttgpr_params`` with the variant's
overrides) then refines the initial map of every window. TT-GPR is local (tiles around where
the initializer fires), so windows around the MCs measure its recall and Dice gain at a small
fraction of the whole-image cost; the whole-image cost is ``scripts/benchmark.py --methods
mcgenref_init ttgpr``.

Printed per variant, pooled over the windows, for the initializer and TT-GPR (both masks at
``refined_threshold`` of the overlay, 0.5): MC objects of 0.2 mm or more detected (any mask
pixel on the object), pixel Dice, false marks (mask components touching no MC) and the seconds
TT-GPR took. The variant ``config`` (no overrides) runs first: it is today's setting, the one a
faster variant must not lose recall or Dice against (``--no-config`` leaves it out when it was
measured already).

Example (the variants of docs/results.md, section 4a)::

    python scripts/tune_ttgpr.py --variant one_round iterations=1 inner_steps=30 \\
        --variant fast iterations=1 inner_steps=30 euler_steps=2 n_samples=1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
S8 = np.ones((3, 3), bool)


def _windows(label: np.ndarray, breast: np.ndarray, size: int) -> list[tuple[slice, slice]]:
    """One ``size`` window per group of MCs (centres closer than ``size / 2`` are grouped)."""
    from bundle.clusters import find_clusters, label_centroids

    lab, n = ndimage.label(label, S8)
    if n == 0:
        return []
    cents = label_centroids(lab, n)[0]
    ids, _ = find_clusters(cents, size / 2.0, 1)
    h, w = label.shape
    out = []
    for g in np.unique(ids):
        c = cents[ids == g].mean(axis=0)
        r0 = int(min(max(round(c[0] - size / 2), 0), max(h - size, 0)))
        c0 = int(min(max(round(c[1] - size / 2), 0), max(w - size, 0)))
        win = (slice(r0, r0 + size), slice(c0, c0 + size))
        if breast[win].any():
            out.append(win)
    return out


def _score(mask: np.ndarray, truth: np.ndarray, spacing: float) -> dict:
    tl, nt = ndimage.label(truth, S8)
    sizes = np.bincount(tl.ravel(), minlength=nt + 1)[1:]
    inc = 2 * np.sqrt(sizes * spacing * spacing / np.pi) >= 0.2 - 1e-9
    hit = np.zeros(nt + 1, bool)
    hit[np.unique(tl[mask & (tl > 0)])] = True
    pl, npred = ndimage.label(mask, S8)
    fp = npred - np.unique(pl[(pl > 0) & (tl > 0)]).size
    return {"obj": int(inc.sum()), "det": int((hit[1:] & inc).sum()), "tp": int((mask & truth).sum()),
            "pred": int(mask.sum()), "truth": int(truth.sum()), "fp": int(fp)}


def _parse_variants(items: list[list[str]]) -> dict[str, dict]:
    out: dict[str, dict] = {"config": {}}
    for item in items:
        name, *pairs = item
        params = {}
        for p in pairs:
            key, sep, value = p.partition("=")
            if not sep:
                raise SystemExit(f"--variant {name}: {p!r} is not KEY=JSON")
            params[key] = json.loads(value)
        out[name] = params
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=ROOT / "work_data" / "real" / "validation")
    ap.add_argument("--cases-per-view", type=int, default=3)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=JSON",
                    help="a named set of ttgpr_params overrides (repeatable)")
    ap.add_argument("--no-config", action="store_true", help="leave out the config's own setting")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    variants = _parse_variants(args.variant)
    if args.no_config:
        variants.pop("config")
        if not variants:
            ap.error("--no-config needs at least one --variant")
    sys.path.insert(0, str(ROOT))
    import torch
    from monai.bundle import ConfigParser
    from tqdm import tqdm

    from bundle.ttgpr import TTGPRInferer

    if not args.folder.is_dir():
        print(f"{args.folder}: not a folder; build it with scripts/make_injected_negatives.py", file=sys.stderr)
        return 2
    with contextlib.chdir(ROOT):
        parser = ConfigParser()
        parser.read_config(["configs/inference.json", "configs/inference_mcgenref.json"])
        parser["bundle_root"] = str(ROOT)
        parser["preprocessing_keys"] = {"load": ["image", "label"], "geometry": ["image", "label"],
                                        "geometry_modes": ["bilinear", "nearest"]}
        pre = parser.get_parsed_content("preprocessing")
        network = parser.get_parsed_content("network")
        generator = parser.get_parsed_content("generator")
        base = dict(parser.get_parsed_content("ttgpr_params"))
        init_inferer = parser.get_parsed_content("inferer")
        threshold = float(parser.get_parsed_content("refined_threshold"))
        spacing = float(parser.get_parsed_content("working_spacing"))
    network.eval()
    images = sorted(p for p in args.folder.iterdir() if p.name.endswith(".dcm"))
    by_view: dict[str, list[Path]] = {}
    for p in images:
        lab = p.with_name(p.name[:-4] + "_label.nii.gz")
        if lab.is_file():
            by_view.setdefault(p.name.rsplit("_", 1)[0], []).append(p)
    cases = []
    for view, paths in sorted(by_view.items()):
        cases += [p for p in paths if "_inj" in p.name][: args.cases_per_view]
    if not cases:
        print(f"{args.folder}: no injected cases (<view>_injN.dcm with labels)", file=sys.stderr)
        return 2
    windows = []  # (x, p0, breast, truth) per window
    for p in tqdm(cases, desc="initializer", unit="case"):
        d = pre({"image": str(p), "label": str(p.with_name(p.name[:-4] + "_label.nii.gz"))})
        x = torch.as_tensor(np.asarray(d["image"]))[None].float()
        b = torch.as_tensor(np.asarray(d["breast"]) > 0)[None].float()
        y = np.asarray(d["label"])[0] > 0.5
        with torch.no_grad():
            p0 = init_inferer(x, network, breast=b)
        for rs, cs in _windows(y, b[0, 0].numpy() > 0, args.window):
            windows.append((x[..., rs, cs].clone(), p0[..., rs, cs].clone(), b[..., rs, cs].clone(), y[rs, cs]))
    print(f"{len(cases)} cases, {len(windows)} windows of {args.window} px", flush=True)
    results = []
    for name, over in variants.items():
        params = {**base, **over}
        inf = TTGPRInferer(generator=generator, init_inferer=init_inferer, **params)
        tot0 = {"obj": 0, "det": 0, "tp": 0, "pred": 0, "truth": 0, "fp": 0}
        tot1 = dict(tot0)
        secs = 0.0
        for x, p0, b, y in tqdm(windows, desc=name, unit="window"):
            t0 = time.perf_counter()
            p1 = inf.refine(x, network, p0, b)
            secs += time.perf_counter() - t0
            for tot, p in ((tot0, p0), (tot1, p1)):
                s = _score(p[0, 0].detach().numpy() >= threshold, y, spacing)
                for k in tot:
                    tot[k] += s[k]
        row = {"variant": name, "overrides": over, "windows": len(windows), "ttgpr_seconds": round(secs, 1)}
        for tag, tot in (("init", tot0), ("ttgpr", tot1)):
            row[f"{tag}_recall"] = round(tot["det"] / max(tot["obj"], 1), 4)
            row[f"{tag}_dice"] = round(2 * tot["tp"] / max(tot["pred"] + tot["truth"], 1), 4)
            row[f"{tag}_false_marks"] = tot["fp"]
        row["objects"] = tot0["obj"]
        results.append(row)
        print(f"{name:>12}: recall {row['init_recall']:.3f} -> {row['ttgpr_recall']:.3f} "
              f"({tot0['det']} -> {tot1['det']} of {tot0['obj']}), Dice {row['init_dice']:.3f} -> {row['ttgpr_dice']:.3f}, "
              f"false marks {tot0['fp']} -> {tot1['fp']}, TT-GPR {secs:.1f} s ({secs / max(len(windows), 1):.2f} s/window)",
              flush=True)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
