"""The batch runner on a corpus of bad and odd inputs, and the command line around it (issue 13).

A temporary folder gets two good phantom mammograms and more than 40 kinds of broken, odd or
hostile files (real DICOM files written with pydicom, PNG/TIFF/NIfTI/MetaImage files). The
runner of ``configs/inference.json`` (refinement on) processes it in-process, and every file's
outcome is checked: its summary row, the reason of a failure (naming the file), the maps of the
odd-but-valid variants (the same as their clean original's, bit for bit), the good images' maps
(unchanged by the company they keep), distinct case folders, permissions, no temporary files and
untouched inputs. ``docs/data.md`` lists the same kinds and what the user gets.

The command-line tests run ``python -m monai.bundle run`` in a subprocess: ``--help``, a misspelt
option, a missing input folder, an output folder that is a file, and DICOMs without Patient
Orientation (every case ok, every map written).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

ROOT = Path(__file__).resolve().parents[1]
MAPS = ("prob", "mask", "refined_prob", "refined_mask", "virtual_normal")


# ----------------------------------------------------------------------------------------------
# the corpus
# ----------------------------------------------------------------------------------------------


@dataclass
class Kind:
    """One kind of input: its files and what the user must get for each."""

    name: str
    files: list[str]
    expect: str  # "ok", "failed" or "skipped" (no row)
    reason: str = ""  # regex the error (failed) or the warnings (ok) must match
    same_as: str | None = None  # the good image whose maps an ok file must reproduce exactly
    notes: dict = field(default_factory=dict)


def _clean(path: Path) -> pydicom.Dataset:
    """The dataset of a good image, decompressed (native little endian pixel data)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    return ds


def _save(ds: pydicom.Dataset, path: Path, ts: str = ExplicitVRLittleEndian) -> None:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True)


def _with_pixels(ds: pydicom.Dataset, arr: np.ndarray, **attrs) -> pydicom.Dataset:
    d = copy.deepcopy(ds)
    arr = np.ascontiguousarray(arr)
    d.Rows, d.Columns = int(arr.shape[0]), int(arr.shape[1])
    d.PixelData = arr.tobytes()
    for k, v in attrs.items():
        setattr(d, k, v)
    return d


def _source_values(ds: pydicom.Dataset) -> np.ndarray:
    """What the reader makes of a MONOCHROME2 image: the modality-LUT values as float32."""
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


def _png_bomb(path: Path, side: int) -> None:
    """A PNG declaring ``side`` x ``side`` grey pixels whose data is a few bytes of zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def build_corpus(folder: Path, good: dict[str, Path]) -> list[Kind]:
    """Write the corpus into ``folder`` (the two good images included) and return its kinds.

    Args:
        folder: an empty folder.
        good: ``{"good_a": path, "good_b": path}`` of two phantom DICOMs (MONOCHROME2 and MONOCHROME1).
    """
    import itk
    import tifffile

    kinds: list[Kind] = []
    for name, src in good.items():
        shutil.copy(src, folder / f"{name}.dcm")
    kinds.append(Kind("clean FFDM (MONOCHROME2)", ["good_a.dcm"], "ok", same_as="good_a"))
    kinds.append(Kind("clean FFDM (MONOCHROME1, MLO, RLE)", ["good_b.dcm"], "ok", same_as="good_b"))
    a = _clean(good["good_a"])
    px = a.pixel_array
    vals = _source_values(a)
    sp = float(a.PixelSpacing[0])

    def ok(kind: str, fname: str, **kw) -> None:
        kinds.append(Kind(kind, [fname], "ok", same_as=kw.pop("same_as", "good_a"), **kw))

    def bad(kind: str, fname: str, reason: str) -> None:
        kinds.append(Kind(kind, [fname], "failed", reason=reason))

    # ---- odd but valid: the same maps as good_a --------------------------------------------
    _save(a, folder / "implicit_vr.dcm", ImplicitVRLittleEndian)
    ok("implicit VR little endian", "implicit_vr.dcm")
    big = copy.deepcopy(a)
    big.PixelData = px.astype(">u2").tobytes()
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pydicom.dcmwrite(folder / "big_endian.dcm", big, little_endian=False, implicit_vr=False, force_encoding=True)
    ok("explicit VR big endian", "big_endian.dcm")
    _save(a, folder / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    ok("deflated explicit VR", "deflated.dcm")
    for fname, ts, kind in (("rle.dcm", RLELossless, "RLE lossless"), ("jpeg2000.dcm", JPEG2000Lossless, "JPEG 2000 lossless"),
                            ("jpegls.dcm", JPEGLSLossless, "JPEG-LS lossless")):
        c = copy.deepcopy(a)
        c.compress(ts)
        c.save_as(folder / fname)
        ok(kind, fname)
    bits = int(a.BitsStored)
    m1 = _with_pixels(a, ((2**bits - 1) - px).astype(np.uint16), PhotometricInterpretation="MONOCHROME1")
    _save(m1, folder / "monochrome1.dcm")
    ok("MONOCHROME1 (inverted storage)", "monochrome1.dcm")
    slope, icpt = float(a.get("RescaleSlope", 1) or 1), float(a.get("RescaleIntercept", 0) or 0)
    signed = _with_pixels(a, (px.astype(np.int32) - 8192).astype(np.int16), PixelRepresentation=1,
                          RescaleIntercept=f"{icpt + 8192 * slope:g}", RescaleSlope=f"{slope:g}")
    _save(signed, folder / "signed.dcm")
    ok("signed pixels with rescale intercept", "signed.dcm")
    no_or = copy.deepcopy(a)
    del no_or.PatientOrientation
    _save(no_or, folder / "no_orientation.dcm")
    ok("no Patient Orientation (anonymised)", "no_orientation.dcm", reason="")
    imager = copy.deepcopy(a)
    del imager.PixelSpacing
    imager.ImagerPixelSpacing = [sp, sp]
    _save(imager, folder / "imager_spacing_only.dcm")
    ok("ImagerPixelSpacing only", "imager_spacing_only.dcm")
    voi = copy.deepcopy(a)
    voi.WindowCenter, voi.WindowWidth = "2000", "3000"
    _save(voi, folder / "voi_window.dcm")
    ok("VOI window present (not applied)", "voi_window.dcm")
    for fname, kind in (("mammo_ünïcødé_乳房.dcm", "non-ASCII file name"), ("good copy (1).dcm", "spaces and brackets in the name"),
                        ("UPPER.DCM", "upper-case extension"), ("IM0001", "no extension (DICOM by content)"),
                        ("1.2.826.0.1.3680043.2.1125.1", "UID as file name")):
        shutil.copy(good["good_a"], folder / fname)
        ok(kind, fname)
    # names that collide: with each other, with the run's own files
    shutil.copy(good["good_a"], folder / "dup.dcm")
    nib.save(nib.Nifti1Image(vals, np.diag([sp, sp, 1.0, 1.0])), folder / "dup.nii.gz")
    Image.fromarray(px.astype(np.uint16)).save(folder / "dup.png")
    kinds.append(Kind("same stem: dup.dcm", ["dup.dcm"], "ok", same_as="good_a"))
    kinds.append(Kind("same stem: dup.nii.gz", ["dup.nii.gz"], "ok", same_as="good_a"))
    kinds.append(Kind("same stem: dup.png (16-bit PNG, no spacing)", ["dup.png"], "failed", reason=r"no pixel spacing.*--pixel_spacing"))
    nib.save(nib.Nifti1Image(vals, np.diag([sp, sp, 1.0, 1.0])), folder / "x.nii")
    nib.save(nib.Nifti1Image(vals, np.diag([sp, sp, 1.0, 1.0])), folder / "x.nii.gz")
    kinds.append(Kind("same stem: x.nii and x.nii.gz", ["x.nii", "x.nii.gz"], "ok", same_as="good_a"))
    nib.save(nib.Nifti1Image(vals[:, :, None], np.diag([sp, sp, 1.0, 1.0])), folder / "hw1.nii.gz")
    ok("NIfTI (H, W, 1)", "hw1.nii.gz")
    img = itk.image_from_array(vals)
    img.SetSpacing([sp, sp])
    itk.imwrite(img, str(folder / "metaimage.mha"))
    ok("MetaImage", "metaimage.mha")
    shutil.copy(good["good_a"], folder / "summary.csv.dcm")
    ok("named like the run's summary (summary.csv.dcm)", "summary.csv.dcm")
    shutil.copy(good["good_a"], folder / "demo_inputs")
    ok("named like the demo folder (demo_inputs)", "demo_inputs")
    shutil.copy(good["good_a"], folder / "run.json.dcm")
    ok("named like the run record (run.json.dcm)", "run.json.dcm")
    # contradicting laterality: good_a is a right breast (chest wall on the right); tag it L
    lat = copy.deepcopy(a)
    lat.ImageLaterality = "L"
    _save(lat, folder / "right_tagged_left.dcm")
    kinds.append(Kind("right breast tagged L", ["right_tagged_left.dcm"], "ok", reason=r"right_tagged_left\.dcm.*laterality"))

    # ---- refused, with the reason in the row ------------------------------------------------
    h, w = px.shape
    _save(_with_pixels(a, np.zeros_like(px)), folder / "all_zero.dcm")
    bad("all-zero image", "all_zero.dcm", r"blank image")
    _save(_with_pixels(a, np.full_like(px, 1234)), folder / "constant.dcm")
    bad("constant image", "constant.dcm", r"blank image")
    raw = (folder / "good_a.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    bad("truncated file", "truncated.dcm", r"corrupt|cannot decode|no pixel data")
    nopix = copy.deepcopy(a)
    del nopix.PixelData
    _save(nopix, folder / "no_pixel_data.dcm")
    bad("no pixel data", "no_pixel_data.dcm", r"no pixel data")
    fpd = copy.deepcopy(a)
    del fpd.PixelData
    fpd.BitsAllocated = 32
    fpd.FloatPixelData = vals.astype(np.float32).tobytes()
    _save(fpd, folder / "float_pixel_data.dcm")
    bad("float pixel data (parametric map style)", "float_pixel_data.dcm", r"no pixel data")
    nosp = copy.deepcopy(a)
    del nosp.PixelSpacing
    _save(nosp, folder / "no_spacing.dcm")
    bad("no pixel spacing", "no_spacing.dcm", r"no pixel spacing.*--pixel_spacing")
    zsp = copy.deepcopy(a)
    zsp.PixelSpacing = [0, 0]
    _save(zsp, folder / "zero_spacing.dcm")
    bad("zero pixel spacing", "zero_spacing.dcm", r"no pixel spacing")
    wsp = copy.deepcopy(a)
    wsp.PixelSpacing = [2.0, 2.0]
    _save(wsp, folder / "wrong_spacing.dcm")
    bad("absurd pixel spacing (2 mm)", "wrong_spacing.dcm", r"spacing looks wrong.*--pixel_spacing")
    rgb = _with_pixels(a, np.stack([px >> 6] * 3, -1).astype(np.uint8), SamplesPerPixel=3, PhotometricInterpretation="RGB",
                       PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7)
    _save(rgb, folder / "rgb.dcm")
    bad("RGB DICOM", "rgb.dcm", r"colour image")
    pal = copy.deepcopy(a)
    pal.PhotometricInterpretation = "PALETTE COLOR"
    _save(pal, folder / "palette.dcm")
    bad("palette colour DICOM", "palette.dcm", r"colour image")
    ct = copy.deepcopy(a)
    ct.Modality = "CT"
    _save(ct, folder / "ct.dcm")
    bad("CT, not MG", "ct.dcm", r"modality 'CT'")
    nomod = copy.deepcopy(a)
    del nomod.Modality
    _save(nomod, folder / "no_modality.dcm")
    bad("no Modality", "no_modality.dcm", r"modality '\(missing\)'")
    mf = _with_pixels(a, np.concatenate([px] * 3), NumberOfFrames=3)
    mf.Rows = h
    _save(mf, folder / "multiframe.dcm")
    bad("multi-frame (tomosynthesis)", "multiframe.dcm", r"multi-frame")
    uts = copy.deepcopy(a)
    uts.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.2.1125.99.7"
    pydicom.dcmwrite(folder / "unknown_ts.dcm", uts, implicit_vr=False, little_endian=True, force_encoding=True)
    bad("unknown transfer syntax", "unknown_ts.dcm", r"unsupported transfer syntax")
    huge = copy.deepcopy(a)
    huge.Rows, huge.Columns = 40000, 40000
    _save(huge, folder / "huge.dcm")
    bad("huge declared size (40000 x 40000)", "huge.dcm", r"image too large")
    _save(_with_pixels(a, px[:32, :32]), folder / "tiny.dcm")
    bad("tiny image (32 x 32)", "tiny.dcm", r"image too small")
    rng = np.random.default_rng(13)
    noise = np.clip(rng.normal(2000, 300, px.shape), 0, 4095).astype(np.uint16)
    _save(_with_pixels(a, noise), folder / "noise.dcm")
    bad("background noise, no breast", "noise.dcm", r"no breast found")
    binary = np.where(px > np.median(px), 4095, 0).astype(np.uint16)
    _save(_with_pixels(a, binary), folder / "binary.dcm")
    bad("binary (mask) image as DICOM", "binary.dcm", r"binary image")
    Image.fromarray(px > np.median(px)).convert("1").save(folder / "one_bit.png")
    bad("1-bit PNG", "one_bit.png", r"1-bit \(binary\) image")
    Image.fromarray(px.astype(np.uint16)).save(folder / "png16.png")
    bad("16-bit PNG without spacing", "png16.png", r"no pixel spacing.*--pixel_spacing")
    tifffile.imwrite(folder / "tiff16.tif", px.astype(np.uint16))
    bad("16-bit TIFF without spacing", "tiff16.tif", r"no pixel spacing")
    Image.fromarray(np.stack([(px >> 6).astype(np.uint8)] * 3, -1)).save(folder / "colour.png")
    bad("RGB PNG", "colour.png", r"colour image")
    _png_bomb(folder / "bomb.png", 11000)
    bad("decompression bomb PNG (11000 x 11000 declared)", "bomb.png", r"image too large|decompression bomb")
    (folder / "truncated.png").write_bytes((folder / "png16.png").read_bytes()[:400])
    bad("truncated PNG", "truncated.png", r"corrupt or unreadable")
    tifffile.imwrite(folder / "multipage.tif", np.stack([px, px]).astype(np.uint16))
    bad("multi-page TIFF", "multipage.tif", r"multi-frame")
    nan = vals.copy()
    nan[100:110, 100:110] = np.nan
    nib.save(nib.Nifti1Image(nan, np.diag([sp, sp, 1.0, 1.0])), folder / "nan.nii.gz")
    bad("NaN in a float NIfTI", "nan.nii.gz", r"NaN/inf")
    inf = vals.copy()
    inf[5, 5] = np.inf
    nib.save(nib.Nifti1Image(inf, np.diag([sp, sp, 1.0, 1.0])), folder / "inf.nii.gz")
    bad("inf in a float NIfTI", "inf.nii.gz", r"NaN/inf")
    nib.save(nib.Nifti1Image(np.stack([vals] * 4, -1), np.diag([sp, sp, 1.0, 1.0])), folder / "volume.nii.gz")
    bad("3-D NIfTI volume", "volume.nii.gz", r"not a single 2-D image")
    rgb_t = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb_arr = np.zeros(px.shape, dtype=rgb_t)
    nib.save(nib.Nifti1Image(rgb_arr, np.diag([sp, sp, 1.0, 1.0])), folder / "rgb.nii.gz")
    bad("RGB NIfTI", "rgb.nii.gz", r"colour|RGB")
    (folder / "empty.dcm").write_bytes(b"")
    bad("empty file", "empty.dcm", r"corrupt|no pixel data")
    (folder / "garbage.dcm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    bad("random bytes named .dcm", "garbage.dcm", r"corrupt|no pixel data")
    buf = io.BytesIO()
    Image.fromarray((px >> 6).astype(np.uint8)).save(buf, format="JPEG")
    (folder / "photo_as.dcm").write_bytes(buf.getvalue())
    bad("a JPEG file named .dcm", "photo_as.dcm", r"corrupt|no pixel data")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    bad("not an image (PDF)", "report.pdf", r"unsupported file type")
    zr = copy.deepcopy(a)
    zr.Rows = 0
    _save(zr, folder / "zero_rows.dcm")
    bad("Rows = 0", "zero_rows.dcm", r"cannot decode|corrupt|too small|not a single")

    # ---- not inputs: no row -------------------------------------------------------------------
    shutil.copy(good["good_a"], folder / ".hidden.dcm")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.uint8), np.eye(4)), folder / "good_a_label.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    (folder / "datalist.json").write_text("{}")
    (folder / "subfolder.dcm").mkdir()
    shutil.copy(good["good_a"], folder / "subfolder.dcm" / "inner.dcm")
    kinds.append(Kind("hidden file", [".hidden.dcm"], "skipped"))
    kinds.append(Kind("label file (*_label.*)", ["good_a_label.nii.gz"], "skipped"))
    kinds.append(Kind("notes and lists (.txt, .json)", ["notes.txt", "datalist.json"], "skipped"))
    kinds.append(Kind("sub-folder (not descended into)", ["subfolder.dcm"], "skipped"))
    return kinds


# ----------------------------------------------------------------------------------------------
# helpers and fixtures
# ----------------------------------------------------------------------------------------------


def make_runner(refine: bool = True):
    """The runner of ``configs/inference.json`` built in-process (no progress bar)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(ROOT)
    parser["refine"] = refine
    parser["runner"]["progress"] = False
    parser["runner"]["cli"] = False
    return parser.get_parsed_content("runner")


def run_on(runner, dataset: Path, out: Path) -> list[dict]:
    runner.dataset_dir = str(dataset)
    runner.output_dir = Path(out)
    return runner.run()


def read_map(case_dir: Path, case: str, key: str) -> np.ndarray:
    return np.asarray(nib.load(str(case_dir / f"{case}_{key}.nii.gz")).dataobj)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> dict[str, Path]:
    from bundle.phantom import make_dataset

    d = tmp_path_factory.mktemp("good")
    make_dataset(d, n_cases=2, seed=7, shape=(512, 384), splits=(0, 0, 2), progress=False)
    first = pydicom.dcmread(d / "case_000.dcm", stop_before_pixels=True)
    assert first.PhotometricInterpretation == "MONOCHROME2" and first.ImageLaterality == "R"
    return {"good_a": d / "case_000.dcm", "good_b": d / "case_001.dcm"}


@pytest.fixture(scope="module")
def runner():
    return make_runner(refine=True)


# ----------------------------------------------------------------------------------------------
# the corpus test
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_corpus_of_bad_and_odd_inputs(good_images, runner, tmp_path):
    ref_in = tmp_path / "ref_in"
    ref_in.mkdir()
    for name, src in good_images.items():
        shutil.copy(src, ref_in / f"{name}.dcm")
    ref_out = tmp_path / "ref_out"
    ref_rows = {r["case"]: r for r in run_on(runner, ref_in, ref_out)}
    assert {r["status"] for r in ref_rows.values()} == {"ok"}
    ref_maps = {c: {k: read_map(ref_out / c, c, k) for k in MAPS} for c in ref_rows}
    assert ref_maps["good_a"]["refined_prob"].shape == (512, 384)  # the refinement ran

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    kinds = build_corpus(corpus, good_images)
    assert len(kinds) >= 40
    before = tree_digest(corpus)
    out = tmp_path / "out"
    rows = run_on(runner, corpus, out)
    by_input = {Path(r["input"]).name: r for r in rows}
    expected_files = {f for k in kinds for f in k.files if k.expect != "skipped"}
    assert set(by_input) == expected_files, set(by_input) ^ expected_files  # one row per input, none for the rest
    assert tree_digest(corpus) == before  # inputs never modified
    names = [r["case"] for r in rows]
    assert len(set(n.casefold() for n in names)) == len(names)  # distinct case folders, never an overwrite

    problems = []
    for kind in kinds:
        for f in kind.files:
            if kind.expect == "skipped":
                continue
            row = by_input[f]
            case_dir = out / row["case"]
            if row["status"] != kind.expect:
                problems.append(f"{kind.name} ({f}): {row['status']} {row['error'] or row.get('warnings')}")
                continue
            if kind.expect == "failed":
                if f not in row["error"]:
                    problems.append(f"{kind.name}: the error does not name the file: {row['error']}")
                if not re.search(kind.reason, row["error"]):
                    problems.append(f"{kind.name}: reason {row['error']!r} does not match {kind.reason!r}")
                if case_dir.exists():
                    problems.append(f"{kind.name}: a failed case has a folder {case_dir}")
                continue
            if kind.reason and not re.search(kind.reason, row["warnings"]):
                problems.append(f"{kind.name}: warnings {row['warnings']!r} do not match {kind.reason!r}")
            marker = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
            missing = [n for n in marker["outputs"] if not (case_dir / n).is_file()]
            if missing or marker["input"] != str(corpus / f):
                problems.append(f"{kind.name}: marker/outputs wrong: missing {missing}")
            if kind.same_as:
                for key in MAPS:
                    got = read_map(case_dir, row["case"], key)
                    if not np.array_equal(got, ref_maps[kind.same_as][key]):
                        problems.append(f"{kind.name}: {key} differs from {kind.same_as}'s")
    assert not problems, "\n".join(problems)

    # the good images: unchanged maps, no warnings (the phantoms' one-part PatientName is no news)
    for good in ("good_a", "good_b"):
        assert by_input[f"{good}.dcm"]["warnings"] == ""
    # the derived DICOM is optional: without Patient Orientation the case is ok either way
    no_or = by_input["no_orientation.dcm"]
    assert (out / no_or["case"] / f"{no_or['case']}_virtual_normal.dcm").is_file() or \
        "virtual_normal.dcm not written" in no_or["warnings"]
    # colliding names got distinct folders that cannot collide with the run's own files
    assert {by_input[f]["case"] for f in ("dup.dcm", "dup.nii.gz", "dup.png", "x.nii", "x.nii.gz")} == \
        {"dup_dcm", "dup_nii_gz", "dup_png", "x_nii", "x_nii_gz"}
    assert by_input["summary.csv.dcm"]["case"] == "summary.csv_dcm"
    assert by_input["demo_inputs"]["case"] not in ("demo_inputs",)
    assert (out / "summary.csv").is_file() and (out / "run.json").is_file()
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "finished" and run["failed"] == sum(r["status"] == "failed" for r in rows)
    # no temporary files or staging folders; outputs honour the umask like the NIfTIs
    hidden = [p for p in out.rglob(".*") if p.name != ".mcref.lock"]
    assert not hidden, hidden
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    case = by_input["good_a.dcm"]["case"]
    for p in (out / "summary.csv", out / "run.json", out / case / "case.json", out / case / f"{case}_overlay.png",
              out / case / f"{case}_clusters.csv", out / case / f"{case}_virtual_normal.dcm", out / case / f"{case}_prob.nii.gz"):
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def bundle_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _error_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("mcref: error:")]


@pytest.mark.slow
def test_help_prints_the_options_and_runs_nothing(tmp_path):
    out = tmp_path / "never"
    p = bundle_cli("--help", "--output_dir", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    for key in ("--dataset_dir", "--output_dir", "--pixel_spacing", "--refine", "--threshold", "--runner#resume",
                "--segai_backend", "--onnx_path"):
        assert key in p.stdout
    assert not out.exists()  # nothing computed, nothing written
    assert "Traceback" not in p.stderr


def test_help_describes_the_segai_runtime_options():
    from bundle.cli import OPTION_HELP, format_help

    config = json.loads((ROOT / "configs" / "inference.json").read_text())
    text = format_help(config, ["configs/inference.json"])
    for key in ("segai_backend", "onnx_path"):
        assert key in config and f"--{key}" in text and OPTION_HELP[key] in text, key
    assert "openvino" in OPTION_HELP["segai_backend"] and "pip install -e .[openvino]" in OPTION_HELP["segai_backend"]


def test_a_none_override_is_refused_not_silently_dropped(capsys, monkeypatch):
    """monai.bundle run drops None-valued overrides; the bundle says so instead of running the default."""
    from bundle.cli import check_command_line

    monkeypatch.chdir(ROOT)
    prog = str(Path("site-packages") / "monai" / "bundle" / "__main__.py")
    with pytest.raises(SystemExit) as e:
        check_command_line([prog, "run", "--config_file", "configs/inference.json", "--max_mark_diameter_mm", "None"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max_mark_diameter_mm None would be ignored" in err and "'$None'" in err
    check_command_line([prog, "run", "--config_file", "configs/inference.json", "--max_mark_diameter_mm", "$None"])


@pytest.mark.slow
def test_misspelt_option_fails_with_the_nearest_key(tmp_path):
    p = bundle_cli("--datset_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"))
    assert p.returncode == 2
    lines = _error_lines(p)
    assert len(lines) == 1 and "--datset_dir" in lines[0] and "did you mean --dataset_dir?" in lines[0]
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_folder_problems_are_one_line_before_any_compute(tmp_path, good_images):
    p = bundle_cli("--dataset_dir", "/nonexistent/mcref-inputs", "--output_dir", str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert _error_lines(p) == ["mcref: error: /nonexistent/mcref-inputs: dataset_dir not found; pass an existing "
                               "folder with --dataset_dir"]
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(good_images["good_a"], inp / "a.dcm")
    as_file = tmp_path / "out_is_a_file"
    as_file.write_text("x")
    p = bundle_cli("--dataset_dir", str(inp), "--output_dir", str(as_file))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert _error_lines(p) == [f"mcref: error: {as_file}: output_dir is a file, not a folder; choose another --output_dir"]
    assert "cases" not in p.stderr  # no case was started


@pytest.mark.slow
def test_dicoms_without_patient_orientation_are_ok_with_all_maps(tmp_path, good_images):
    inp = tmp_path / "anon"
    inp.mkdir()
    for name, src in good_images.items():
        ds = pydicom.dcmread(src)
        del ds.PatientOrientation
        ds.save_as(inp / f"{name}.dcm")
    out = tmp_path / "out"
    p = bundle_cli("--dataset_dir", str(inp), "--output_dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for r in rows:
        case = r["case"]
        for key in MAPS:
            assert (out / case / f"{case}_{key}.nii.gz").is_file()
        for extra in ("_overlay.png", "_clusters.csv", "_clusters.png"):
            assert (out / case / f"{case}{extra}").is_file()
