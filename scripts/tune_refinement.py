#!/usr/bin/env python
"""Sweep the operating points of SegAI and its refiners on VALIDATION data (never the held-out set).

usage:
    python scripts/tune_refinement.py VAL/datalist.json [MORE/datalist.json ...] [--key test]
        [--segai 0.5 0.1] [--genai 0.7 0.8 0.9] [--sp 0.1 0.2 0.3] [--dilation 1]

SegAI runs once per case (preprocessing, inferer and weights of ``configs/evaluate_study.json``);
then every refiner runs on that map and each threshold is scored. Printed per row: mean over
images of pixel sensitivity, PPV and activation rate (% of the breast), and the same on the
images of the first datalist only and of the others ("first" / "rest"). The hole of the
generative and biharmonic rows is SegAI at the last ``--segai`` value (default 0.1) dilated
by ``--dilation`` pixels; the other inpainting settings (crops or tiles) are those of
``configs/evaluate_study.json#refiner_kwargs``. Exit code 0.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def study_parser(root: Path = ROOT):
    """The parser of ``configs/evaluate_study.json`` with ``bundle_root`` set and its ``%`` imports
    expanded. The config imports blocks of ``configs/inference.json`` by a path relative to the
    working directory, so it is read from the bundle root, whatever the caller's directory.

    Args:
        root: bundle root.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    with contextlib.chdir(root):
        parser.read_config(str(Path(root) / "configs" / "evaluate_study.json"))
        parser["bundle_root"] = str(root)
        parser.resolve_macro_and_relative_ids()
    return parser


def _metrics(pred: np.ndarray, truth: np.ndarray, breast: np.ndarray) -> tuple[float, float, float]:
    pred = pred & breast
    tp = float((pred & truth).sum())
    return tp / max(float(truth.sum()), 1.0), tp / max(float(pred.sum()), 1.0), float(pred.sum()) / max(float(breast.sum()), 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datalists", nargs="+", type=Path)
    ap.add_argument("--key", default="test", help="datalist section")
    ap.add_argument("--segai", nargs="+", type=float, default=[0.5, 0.1], help="SegAI thresholds; the hole uses the last")
    ap.add_argument("--genai", nargs="+", type=float, default=[0.7, 0.8, 0.9], help="refined-map thresholds")
    ap.add_argument("--sp", nargs="+", type=float, default=[0.1, 0.2, 0.3], help="SegAI+R:SP thresholds")
    ap.add_argument("--dilation", type=int, default=1)
    args = ap.parse_args()
    args.segai = list(dict.fromkeys(args.segai))  # a repeated value would be scored twice
    sys.path.insert(0, str(ROOT))
    from monai.data import load_decathlon_datalist
    from tqdm import tqdm

    from bundle.engine import load_checkpoint
    from bundle.pipeline import MCPipeline
    from bundle.refine import build_refiner

    parser = study_parser()
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    seg_net = load_checkpoint(parser.get_parsed_content("network_def"), ROOT / "models" / "model.pt", "cpu")
    inp_net = load_checkpoint(parser.get_parsed_content("inpainter_def"), ROOT / "models" / "inpainter.pt", "cpu")

    cases, group = [], []
    for g, dl in enumerate(args.datalists):
        for item in load_decathlon_datalist(str(dl), data_list_key=args.key):
            cases.append(item)
            group.append(0 if g == 0 else 1)
    group_a = np.asarray(group)
    ts = args.segai[-1]
    # the study's inpainting settings (mode, crops, tiles), with this sweep's hole
    genai_kwargs = dict(parser.get_parsed_content("refiner_kwargs")["segai+genai"])
    genai_kwargs.update(threshold=ts, dilation_px=args.dilation)
    refiners = {
        "genai": build_refiner("segai+genai", net=inp_net, **genai_kwargs),
        "biharmonic": build_refiner("segai+classical", threshold=ts, dilation_px=args.dilation),
        "sp1": build_refiner("segai+sp1", segai_threshold=ts),
        "sp2": build_refiner("segai+sp2", segai_threshold=ts),
    }
    pipe = MCPipeline(seg_net, inferer)  # the one two-stage pipeline; refiners passed per call
    rows: dict[str, list[tuple[float, float, float]]] = {}
    true_rate = []
    for item in tqdm(cases, desc="cases", unit="case"):
        d = pre(dict(item))
        img, breast = d["image"][0].numpy(), d["breast"][0].numpy() > 0
        truth = d["label"][0].numpy() > 0
        prob = pipe.segai(img, breast)
        true_rate.append(float((truth & breast).sum()) / max(float(breast.sum()), 1.0))
        for t in args.segai:
            rows.setdefault(f"SegAI (>= {t:g})", []).append(_metrics(prob >= t, truth, breast))
        for name, ref in refiners.items():
            out = pipe.refine(img, prob, breast, refiner=ref)["refined_prob"]
            thresholds = args.sp if name.startswith("sp") else args.genai
            label = {"genai": "GenAI", "biharmonic": "Biharmonic", "sp1": "SP1", "sp2": "SP2"}[name]
            for t in thresholds:
                rows.setdefault(f"SegAI({ts:g})+R:{label} (>= {t:g})", []).append(_metrics(out >= t, truth, breast))
    print(f"\n{len(cases)} images, true activation rate {100 * np.mean(true_rate):.4f} %")
    print("| method (threshold) | sensitivity | PPV | activation rate | first: sens / act | rest: sens / act |")
    print("|---|---|---|---|---|---|")
    for name, vals in rows.items():
        m = np.asarray(vals)
        parts = []
        for sel in (group_a == 0, group_a == 1):
            parts.append(f"{m[sel, 0].mean():.3f} / {100 * m[sel, 2].mean():.4f} %" if sel.any() else "-")
        print(f"| {name} | {m[:, 0].mean():.3f} | {m[:, 1].mean():.3f} | {100 * m[:, 2].mean():.4f} % | {parts[0]} | {parts[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
