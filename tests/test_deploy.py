"""The MONAI Deploy application (deploy/mcref_app) and the bundle export (scripts/export_bundle.py).

One module-scoped run exports a randomly initialised SegAI to a bundle archive, runs the app on a
folder holding two good mammograms (one right MLO MONOCHROME1) and one of each kind of bad input,
and runs the bundle's own inference on the good ones; the tests then compare.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (512, 416)

pytest.importorskip("monai.deploy.core", reason="monai-deploy-app-sdk is not installed (pip install -e '.[deploy]')")


def run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def random_checkpoint(path: Path, seed: int = 7) -> Path:
    """A randomly initialised SegAI state dict (the trained weights come later)."""
    import torch

    from bundle.networks import SegAINet

    torch.manual_seed(seed)
    torch.save(SegAINet().state_dict(), path)
    return path


def write_good(folder: Path, name: str, laterality: str, view: str, photometric: str, seed: int, patient: str) -> Path:
    from bundle.phantom import make_phantom, write_mg_dicom

    ph = make_phantom(shape=SHAPE, view=view, laterality=laterality, seed=seed)
    path = folder / name
    write_mg_dicom(path, ph["image"].astype(np.uint16), spacing=0.07, laterality=laterality, view=view,
                   seed=seed, photometric=photometric, patient_id=patient, use_imager_spacing=True)
    return path


def write_bad_inputs(folder: Path, template: Path) -> dict[str, str]:
    """One bad input per kind, each in a series (and study) of its own; returns kind -> SeriesInstanceUID."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    out = {}

    def variant(kind: str, edit) -> None:
        ds = pydicom.dcmread(template)
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", kind])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", kind])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["sop", kind])
        ds.PatientID = f"BAD-{kind}"
        edit(ds)
        ds.save_as(folder / f"bad_{kind}.dcm", enforce_file_format=True)
        out[kind] = str(ds.SeriesInstanceUID)

    def not_mg(ds):
        ds.Modality = "CT"

    def multi_frame(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    def rgb(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()

    def no_spacing(ds):
        for kw in ("PixelSpacing", "ImagerPixelSpacing"):
            if kw in ds:
                delattr(ds, kw)

    def bad_syntax(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"

    for kind, edit in [("not_mg", not_mg), ("multi_frame", multi_frame), ("rgb", rgb),
                       ("no_spacing", no_spacing), ("bad_syntax", bad_syntax)]:
        variant(kind, edit)
    return out


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = random_checkpoint(tmp / "random.pt")
    archive = tmp / "mcref_bundle.zip"
    run([sys.executable, "scripts/export_bundle.py", "--ckpt", f"network_def={ckpt}", "--output", str(archive)])
    good = tmp / "good"
    good.mkdir()
    right = write_good(good, "right_mlo.dcm", "R", "MLO", "MONOCHROME1", seed=11, patient="P1")
    left = write_good(good, "left_cc.dcm", "L", "CC", "MONOCHROME2", seed=11, patient="P1")
    inp = tmp / "in"
    inp.mkdir()
    for f in (right, left):
        (inp / f.name).write_bytes(f.read_bytes())
    bad = write_bad_inputs(inp, left)
    out = tmp / "out"
    app = run([sys.executable, "-m", "deploy.mcref_app", "-i", str(inp), "-o", str(out), "--bundle", str(archive),
               "-w", str(tmp / "work")])
    ref = tmp / "ref"
    run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(good), "--output_dir", str(ref), "--ckpt_path", str(ckpt), "--refiner", "$None"])
    return {"archive": archive, "in": inp, "out": out, "ref": ref, "good": [right, left], "bad": bad, "app": app}


def read_nii(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.squeeze(np.asarray(nib.load(str(path)).dataobj))


@pytest.mark.slow
def test_archive_holds_the_deployable_bundle_only(deployed):
    with zipfile.ZipFile(deployed["archive"]) as zf:
        names = zf.namelist()
    assert all(n.startswith("mcref/") for n in names)
    rel = {n[len("mcref/"):] for n in names}
    for need in ("configs/inference.json", "configs/metadata.json", "models/model.ts", "models/model.pt",
                 "bundle/__init__.py", "bundle/data.py", "LICENSE", "models/export.json"):
        assert need in rel, need
    assert not any(p.startswith(("tests/", "eval/", "work_data/", "deploy/")) or "__pycache__" in p or p.endswith(".pyc")
                   for p in rel)
    report = json.loads(zipfile.ZipFile(deployed["archive"]).read("mcref/models/export.json"))
    assert [n["name"] for n in report["networks"]] == ["segai", "inpainter", "mcgenref_seg", "rflow"]
    assert all(n["verified"] for n in report["networks"]) and report["metadata_verified"]
    # every TorchScript file is in the archive and runs; the inpainter keeps known pixels
    import io

    import torch

    with zipfile.ZipFile(deployed["archive"]) as zf:
        ts = {n["name"]: torch.jit.load(io.BytesIO(zf.read(f"mcref/{n['filepath']}"))) for n in report["networks"]}
    x = torch.rand(1, 1, 128, 128)
    hole = torch.zeros_like(x)
    hole[..., 40:60, 50:70] = 1.0
    with torch.no_grad():
        filled = ts["inpainter"](torch.cat([x, hole], 1))
        assert filled.shape == x.shape and torch.equal(filled[hole == 0], x[hole == 0])
        assert ts["segai"](x).shape == x.shape and ts["mcgenref_seg"](x).shape == x.shape
        v = ts["rflow"](torch.rand(1, 4, 64, 64), torch.tensor([500]))
        assert v.shape == (1, 1, 64, 64) and torch.isfinite(v).all()


@pytest.mark.slow
def test_seg_frames_equal_the_bundles_own_mask(deployed):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    for src in deployed["good"]:
        ds = pydicom.dcmread(src)
        folder = deployed["out"] / ds.SeriesInstanceUID
        seg = hd.seg.segread(folder / f"{ds.SOPInstanceUID}_seg.dcm")
        assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == 1
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
        ref = read_nii(deployed["ref"] / src.stem / f"{src.stem}_mask.nii.gz")
        assert frame.shape == ds.pixel_array.shape == ref.shape
        assert np.array_equal(frame.astype(np.uint8), ref.astype(np.uint8)), f"{src.name}: SEG differs from the bundle's mask"
        item = seg.SegmentSequence[0]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (codes.SCT.CalcificationOfBreast.value, "SCT")
        assert seg.StudyInstanceUID == ds.StudyInstanceUID and seg.PatientID == ds.PatientID
        refd = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert refd.ReferencedSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.slow
def test_probability_map_object_has_the_source_geometry(deployed):
    from pydicom.pixels import apply_modality_lut

    for src in deployed["good"]:
        ds = pydicom.dcmread(src)
        sc = pydicom.dcmread(deployed["out"] / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}_prob.dcm")
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
        assert (sc.Rows, sc.Columns) == (ds.Rows, ds.Columns)
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in ds.ImagerPixelSpacing]
        assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert sc.StudyInstanceUID == ds.StudyInstanceUID
        prob = apply_modality_lut(sc.pixel_array, sc)
        ref = read_nii(deployed["ref"] / src.stem / f"{src.stem}_prob.nii.gz")
        assert np.abs(prob - ref).max() <= 1.0e-5 + 1e-7


@pytest.mark.slow
def test_bad_inputs_are_skipped_with_a_reason_and_no_output(deployed):
    out = deployed["out"]
    expect = {
        "not_mg": "not a mammogram",
        "multi_frame": "multi-frame",
        "rgb": "colour",
        "no_spacing": "missing pixel spacing",
        "bad_syntax": "transfer syntax",
    }
    for kind, suid in deployed["bad"].items():
        status = json.loads((out / suid / "status.json").read_text())
        assert status["status"] == "skipped", (kind, status)
        assert expect[kind] in status["reason"], (kind, status["reason"])
        assert not list((out / suid).glob("*.dcm")), f"{kind}: partial output written"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "skipped": 5, "failed": 0}
    studies = {s["study_instance_uid"]: s for s in summary["studies"]}
    bad_study = pydicom.dcmread(deployed["in"] / "bad_not_mg.dcm").StudyInstanceUID
    assert studies[bad_study]["status"] == "skipped" and "without a usable breast" in studies[bad_study]["reason"]
    good_study = pydicom.dcmread(deployed["good"][0]).StudyInstanceUID
    assert studies[good_study]["status"] == "ok"
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert '"failed": 0' in deployed["app"].stdout


def test_unsafe_bundle_archive_is_refused(tmp_path):
    from deploy.mcref_app.bundle_io import BundleError, resolve_bundle

    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", "x")
        zf.writestr("b/configs/metadata.json", "{}")
    with pytest.raises(BundleError, match="unsafe path"):
        resolve_bundle(bad, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(BundleError, match="not a MONAI bundle"):
        resolve_bundle(tmp_path, cache_dir=tmp_path / "cache")


def test_derived_uids_are_deterministic():
    from deploy.mcref_app.dicom_out import derived_uid

    a = derived_uid("1.2.3", "seg", "0.1.0")
    assert a == derived_uid("1.2.3", "seg", "0.1.0")
    assert a != derived_uid("1.2.3", "prob", "0.1.0") and a != derived_uid("1.2.3", "seg", "0.2.0")
