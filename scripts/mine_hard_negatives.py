#!/usr/bin/env python
"""Mine SegAI's hard negatives on the TRAINING views of a datalist (issue 11).

usage:
    python scripts/mine_hard_negatives.py [--datalist work_data/real/datalist.json]
        [--ckpt models/model.pt] [--network-def JSON] [--threshold 0.3] [--margin 3] [--out DATALIST]
        [--subdir hardneg] [--keep-previous]

The shipped SegAI (2026-12-03) was trained on hard negatives mined with the SegAI shipped before
it, which lives in git history (docs/training.md):

    git show dfee5cf:models/model.pt > eval/segai_dfee5cf.pt
    python scripts/mine_hard_negatives.py --ckpt eval/segai_dfee5cf.pt \
        --network-def '{"norm": "instance", "act": "prelu"}'

Every ``training`` case of the datalist goes through the bundle's preprocessing (the same
transforms and working grid as inference) and the SegAI of ``--ckpt``; the pixels inside the
breast where SegAI's probability is at least ``--threshold`` and that lie more than ``--margin``
working-grid pixels from a labelled MC are the case's hard negatives: vessel crossings, skin
line, film grain, wherever the model fires on real tissue. They are written as coordinates
(``<datalist folder>/hardneg/<stem>.npz``, :func:`bundle.training.save_hard_negatives`) and a copy
of the datalist (``--out``, default ``<datalist folder>/datalist_hardneg.json``) gives each
training case a ``hardneg`` key. ``configs/train_segai_real.json`` reads that copy and samples
crops centred on hard negatives (``MakeSamplingMapd``, class 3). The validation and held-out
sections are copied unchanged and never mined.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", type=Path, default=ROOT / "work_data" / "real" / "datalist.json")
    ap.add_argument("--ckpt", type=Path, default=ROOT / "models" / "model.pt", help="SegAI that is mined")
    ap.add_argument("--network-def", default=None,
                    help="JSON object of network_def arguments of --ckpt that differ from configs/inference.json's,"
                         " e.g. '{\"norm\": \"instance\", \"act\": \"prelu\"}' for the SegAI shipped before 2026-12-03")
    ap.add_argument("--threshold", type=float, default=0.3, help="SegAI probability that counts as firing")
    ap.add_argument("--margin", type=int, default=3, help="working-grid pixels kept clear around each MC")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--subdir", default="hardneg",
                    help="folder beside the datalist that receives the coordinate files (a second mining round"
                         " writes to its own folder and keeps the first)")
    ap.add_argument("--keep-previous", action="store_true",
                    help="add the hard negatives already named by --datalist's 'hardneg' keys (a second round"
                         " mined with the SegAI the first round trained: the union of both)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    import torch
    from monai.bundle import ConfigParser
    from scipy import ndimage
    from tqdm import tqdm

    from bundle.training import load_hard_negatives, save_hard_negatives

    datalist = args.datalist.resolve()
    if not datalist.is_file():
        print(f"{datalist}: datalist not found; build it with scripts/make_injected_negatives.py", file=sys.stderr)
        return 2
    if not args.ckpt.is_file():
        print(f"{args.ckpt}: checkpoint not found", file=sys.stderr)
        return 2
    with contextlib.chdir(ROOT):
        parser = ConfigParser()
        parser.read_config("configs/inference.json")
        parser["bundle_root"] = str(ROOT)
        parser["preprocessing_keys"] = {"load": ["image", "label"], "geometry": ["image", "label"],
                                        "geometry_modes": ["bilinear", "nearest"]}
        parser["ckpt_path"] = str(args.ckpt.resolve())
        parser["refine"] = False
        if args.network_def:
            for key, value in json.loads(args.network_def).items():
                parser[f"network_def#{key}"] = value
        pre = parser.get_parsed_content("preprocessing")
        pipeline = parser.get_parsed_content("pipeline")  # SegAI runs through the one pipeline
    spec = json.loads(datalist.read_text())
    out_dir = datalist.parent / args.subdir
    n_total = 0
    for item in tqdm(spec.get("training", []), desc="mining hard negatives", unit="case"):
        d = pre({"image": str(datalist.parent / item["image"]), "label": str(datalist.parent / item["label"])})
        breast = np.asarray(d["breast"])[0] > 0.5
        with torch.inference_mode():
            prob = pipeline.segai(d["image"], breast)
        label = np.asarray(d["label"])[0] > 0.5
        near_mc = ndimage.binary_dilation(label, iterations=args.margin) if label.any() else label
        hard = (prob >= args.threshold) & breast & ~near_mc
        if args.keep_previous and item.get("hardneg"):
            rows, cols = load_hard_negatives(datalist.parent / item["hardneg"], hard.shape)
            hard[rows.numpy(), cols.numpy()] = True
        stem = Path(item["image"]).name.split(".")[0]
        save_hard_negatives(out_dir / f"{stem}.npz", hard)
        item["hardneg"] = f"{args.subdir}/{stem}.npz"
        n_total += int(hard.sum())
        tqdm.write(f"{stem}: {int(hard.sum())} hard-negative pixels")
    out = args.out or datalist.parent / "datalist_hardneg.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, out)
    print(f"{len(spec.get('training', []))} training cases, {n_total} hard-negative pixels; datalist: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
