#!/usr/bin/env python
"""Write a synthetic FFDM data set (DICOM + NIfTI labels + datalist.json) for mcref.

Examples::

    python scripts/make_demo_data.py --out demo_data --n 20 --seed 0
    python scripts/make_demo_data.py --out demo_data_neg --n 10 --no-mcs
    python scripts/make_demo_data.py --n 0 --figures docs/img --nyu-dir /path/to/nyu-ffdm-normals

The data set is fully determined by ``--seed`` (and the size options). ``--figures`` also
renders the pictures of ``docs/phantom.md`` (full-size CC and MLO phantoms, a zoom on an MC
cluster with its label contour, and a side-by-side view with real images when
``--nyu-dir`` is given).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.phantom import make_dataset, make_phantom  # noqa: E402


def _window(img: np.ndarray, breast: np.ndarray, lo_pct: float = 0.0, hi_pct: float = 99.8) -> np.ndarray:
    """Map an image to 8 bits with a window taken from breast percentiles.

    Args:
        img: image (bright = dense).
        breast: breast mask.
        lo_pct: percentile of breast pixels mapped to black (0 means value 0).
        hi_pct: percentile of breast pixels mapped to white.
    """
    vals = img[breast > 0].astype(np.float64)
    lo = float(np.percentile(vals, lo_pct)) if lo_pct > 0 else 0.0
    hi = float(np.percentile(vals, hi_pct))
    out = np.clip((img.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0, 1)
    return (out * 255 + 0.5).astype(np.uint8)


def _resize(img: np.ndarray, height: int) -> np.ndarray:
    """Resize an 8-bit image to ``height`` rows (aspect kept, Lanczos).

    Args:
        img: 2-D or RGB ``uint8`` image.
        height: output rows.
    """
    from PIL import Image

    width = max(1, int(round(img.shape[1] * height / img.shape[0])))
    return np.asarray(Image.fromarray(img).resize((width, height), Image.LANCZOS))


def _save_png(path: Path, img: np.ndarray) -> None:
    """Save an 8-bit image as an optimised PNG.

    Args:
        path: destination.
        img: ``uint8`` image.
    """
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, optimize=True)


def make_figures(out_dir: Path, seed: int, nyu_dir: Path | None, height: int = 640) -> None:
    """Render the documentation pictures of the phantom.

    Args:
        out_dir: folder for ``phantom_*.png``.
        seed: phantom seed.
        nyu_dir: folder with real NYU PNG views (L-CC.png, L-MLO.png), optional.
        height: rows of the full-view pictures.
    """
    from scipy import ndimage as ndi

    views = {}
    for view in ("CC", "MLO"):
        t0 = time.perf_counter()
        ph = make_phantom(shape=(4084, 3328), spacing=0.07, view=view, laterality="L", seed=seed, density="b")
        print(f"{view}: 4084 x 3328 phantom in {time.perf_counter() - t0:.1f} s", flush=True)
        views[view] = ph
        _save_png(out_dir / f"phantom_{view.lower()}.png", _resize(_window(ph["image"], ph["breast"]), height))

    # zoom on the largest MC cluster of the CC view, with and without the label contour
    ph = views["CC"]
    clusters = ph["info"]["clusters"]
    if clusters:
        cl = max(clusters, key=lambda c: float(np.mean([m["contrast"] * m["diameter_mm"] for m in c["mcs"]])))
        r, c = (int(round(v)) for v in cl["centre"])
        half = 128
        r0 = int(np.clip(r - half, 0, ph["image"].shape[0] - 2 * half))
        c0 = int(np.clip(c - half, 0, ph["image"].shape[1] - 2 * half))
        crop = ph["image"][r0 : r0 + 2 * half, c0 : c0 + 2 * half].astype(np.float64)
        lab = ph["label"][r0 : r0 + 2 * half, c0 : c0 + 2 * half] > 0
        lo, hi = np.percentile(crop, [0.5, 99.9])
        g = (np.clip((crop - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        g = np.kron(g, np.ones((2, 2), dtype=np.uint8))
        lab2 = np.kron(lab, np.ones((2, 2), dtype=bool))
        edge = ndi.binary_dilation(lab2) & ~lab2  # contour just outside the labelled pixels
        rgb = np.repeat(g[..., None], 3, axis=2)
        over = rgb.copy()
        over[edge] = (255, 40, 40)
        gap = np.full((g.shape[0], 8, 3), 255, dtype=np.uint8)
        _save_png(out_dir / "phantom_zoom.png", np.concatenate([rgb, gap, over], axis=1))

    if nyu_dir is not None and (nyu_dir / "L-CC.png").is_file():
        from PIL import Image

        tiles = []
        for name in ("L-CC", "L-MLO"):
            real = np.asarray(Image.open(nyu_dir / f"{name}.png").convert("L"))
            tiles.append(_resize(real, 440))
        for view in ("CC", "MLO"):
            p = views[view]
            tiles.append(_resize(_window(p["image"], p["breast"]), 440))
        gap = np.full((440, 6), 255, dtype=np.uint8)
        row = []
        for t in tiles:
            row += [t, gap]
        _save_png(out_dir / "phantom_vs_nyu.png", np.concatenate(row[:-1], axis=1))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description="Generate a synthetic FFDM data set with exact microcalcification labels "
        "(MG DICOM images, NIfTI labels, MONAI datalist.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo_data"), help="output folder")
    parser.add_argument("--n", type=int, default=20, help="number of cases (0: none, e.g. with --figures)")
    parser.add_argument("--seed", type=int, default=0, help="master seed; same seed -> same pixel data")
    parser.add_argument("--rows", type=int, default=1024, help="image rows")
    parser.add_argument("--cols", type=int, default=832, help="image columns")
    parser.add_argument("--spacing", type=float, default=0.07, help="pixel size in mm")
    parser.add_argument(
        "--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of training, validation and test cases",
    )
    parser.add_argument("--no-mcs", action="store_true", help="generate normal images (empty labels)")
    parser.add_argument("--negative-fraction", type=float, default=0.0, help="fraction of cases without MCs")
    parser.add_argument("--no-traps", action="store_true", help="leave out false-positive traps (text, marker, spikes)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--figures", type=Path, default=None, help="also render the docs pictures into this folder")
    parser.add_argument("--nyu-dir", type=Path, default=None, help="folder with real NYU PNG views for the comparison picture")
    args = parser.parse_args(argv)

    if args.n > 0:
        t0 = time.perf_counter()
        path = make_dataset(
            args.out,
            args.n,
            seed=args.seed,
            shape=(args.rows, args.cols),
            spacing=args.spacing,
            splits=tuple(args.splits),
            with_mcs=not args.no_mcs,
            progress=not args.no_progress,
            negative_fraction=args.negative_fraction,
            traps=not args.no_traps,
        )
        print(f"wrote {args.n} cases and {path} in {time.perf_counter() - t0:.1f} s")
    if args.figures is not None:
        make_figures(args.figures, args.seed, args.nyu_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
