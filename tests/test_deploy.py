"""The MONAI Deploy application (deploy/mcref_app) and the bundle export (scripts/export_bundle.py).

One module-scoped run exports the bundle (the shipped SegAI and inpainter weights) to an archive,
runs the app on a folder holding two good mammograms (one right MLO MONOCHROME1), one mammogram
whose SeriesInstanceUID and SOPInstanceUID are ``..``, one bad DICOM of each kind, an empty file
and a text file, and runs the bundle's own inference (``python -m monai.bundle run``) on the good
ones; the tests then compare the app's DICOM objects with the bundle's files. Fast tests of the
output names, the result writer and the bundle archive need no SDK.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (512, 416)
SAFE = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z._-]*$")


def run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def write_good(folder: Path, name: str, laterality: str, view: str, photometric: str, seed: int, patient: str) -> Path:
    from bundle.phantom import make_phantom, write_mg_dicom

    ph = make_phantom(shape=SHAPE, view=view, laterality=laterality, seed=seed)
    path = folder / name
    write_mg_dicom(path, ph["image"].astype(np.uint16), spacing=0.07, laterality=laterality, view=view,
                   seed=seed, photometric=photometric, patient_id=patient, use_imager_spacing=True)
    return path


def write_variant(template: Path, path: Path, kind: str, edit=None, uids: tuple[str, str] | None = None) -> pydicom.Dataset:
    """A copy of ``template`` in a study and series of its own (or with the given series/SOP UIDs)."""
    import warnings

    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", kind])
    series, sop = uids or (generate_uid(entropy_srcs=["series", kind]), generate_uid(entropy_srcs=["sop", kind]))
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID = f"T-{kind}"
    if edit is not None:
        edit(ds)
    with warnings.catch_warnings():  # invalid UIDs are the point of some variants
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return ds


def write_bad_inputs(folder: Path, template: Path) -> dict[str, str]:
    """One bad input per kind, each in a series (and study) of its own; returns kind -> SeriesInstanceUID."""
    from pydicom.encaps import encapsulate

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

    out = {}
    for kind, edit in [("not_mg", not_mg), ("multi_frame", multi_frame), ("rgb", rgb),
                       ("no_spacing", no_spacing), ("bad_syntax", bad_syntax)]:
        out[kind] = str(write_variant(template, folder / f"bad_{kind}.dcm", kind, edit).SeriesInstanceUID)
    return out


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def read_nii(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.squeeze(np.asarray(nib.load(str(path)).dataobj))


# ------------------------------------------------------------------ fast: no SDK needed
def test_safe_name_never_leaves_the_folder():
    from bundle.dicom import safe_name

    assert safe_name("1.2.840.10008.5.1.4.1.1.1.2") == "1.2.840.10008.5.1.4.1.1.1.2"  # a UID stays as is
    bad = ["..", ".", "", "../../etc", "/abs/path", "a/b", "a\\b", ".hidden", "x" * 300, "é", "a b"]
    names = [safe_name(v) for v in bad]
    for v, n in zip(bad, names):
        assert SAFE.match(n) and n not in (".", "..") and "/" not in n, (v, n)
        assert len(n) <= 64 + 13, (v, n)
    assert len(set(names)) == len(names), "different values must not share a name"
    assert safe_name("a_b") != safe_name("a/b") and safe_name(None) == safe_name("")


def _case_for(ds_path: Path):
    from deploy.mcref_app.cases import STATUS_OK, MGCase

    ds = pydicom.dcmread(ds_path)
    rng = np.random.default_rng(0)
    prob = rng.random((ds.Rows, ds.Columns)).astype(np.float32)
    case = MGCase(study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID), sop_uid=str(ds.SOPInstanceUID),
                  modality="MG", source_path=str(ds_path), dataset=ds, status=STATUS_OK,
                  mask=(prob > 0.99).astype(np.uint8), prob=prob, virtual_normal=prob * 0.5)
    case.mask_pixels = int(case.mask.sum())
    return case


def test_writer_keeps_every_output_inside_the_output_folder(tmp_path):
    """SeriesInstanceUID / SOPInstanceUID ``..`` and path-like UIDs, and a series folder that is a
    link out of OUT: nothing is written outside OUT, every name is of safe characters."""
    pytest.importorskip("highdicom")
    from bundle.phantom import make_phantom, write_mg_dicom
    from deploy.mcref_app.writer import ResultWriter

    src = tmp_path / "src"
    src.mkdir()
    ph = make_phantom(shape=(128, 96), view="CC", laterality="L", seed=3)
    template = src / "t.dcm"
    write_mg_dicom(template, ph["image"].astype(np.uint16), spacing=0.07, laterality="L", view="CC", seed=3,
                   patient_id="PS")
    dotdot = write_variant(template, src / "dotdot.dcm", "dotdot", uids=("..", ".."))
    pathy = write_variant(template, src / "pathy.dcm", "pathy", uids=("../../escape", "/tmp/abs"))
    linked = write_variant(template, src / "linked.dcm", "linked")
    run_dir = tmp_path / "run"
    out = run_dir / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir(parents=True)
    (out / str(linked.SeriesInstanceUID)).symlink_to(outside, target_is_directory=True)

    cases = [_case_for(src / "dotdot.dcm"), _case_for(src / "pathy.dcm"), _case_for(src / "linked.dcm")]
    summary = ResultWriter(out, version="test").write_all(
        cases, unread=[{"source": str(src / "junk.txt"), "reason": "not a DICOM file"}])

    assert not any(outside.iterdir()), "written through a link out of the output folder"
    assert {p for p in files_under(tmp_path) if out not in p.parents} == files_under(src)
    for p in files_under(out):
        for part in p.relative_to(out).parts:
            assert SAFE.match(part) and part not in (".", ".."), p
    assert summary["counts"] == {"ok": 2, "skipped": 1, "failed": 1, "files": 4}
    by_sop = {i["sop_instance_uid"]: i for s in summary["series"] for i in s["instances"]}
    assert set(by_sop[str(dotdot.SOPInstanceUID)]["outputs"]) == {"seg", "prob", "virtual_normal"}
    assert set(by_sop[str(pathy.SOPInstanceUID)]["outputs"]) == {"seg", "prob", "virtual_normal"}
    assert "outside the output folder" in by_sop[str(linked.SOPInstanceUID)]["reason"]
    for rec in by_sop.values():
        for f in rec["outputs"].values():
            assert out in Path(f).parents and Path(f).is_file()
    # the objects are readable and reference their source
    seg = pydicom.dcmread(by_sop[".."]["outputs"]["seg"])
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ".."


def test_segs_of_pixel_spacing_sources_read_back(tmp_path):
    """Sources with PixelSpacing (with or without BodyPartThickness) give SEGs that highdicom reads."""
    import highdicom as hd

    from bundle.dicom import FRACTIONAL_MAX, make_fractional_seg, make_seg
    from bundle.phantom import make_phantom, write_mg_dicom

    ph = make_phantom(shape=(96, 80), view="MLO", laterality="R", seed=5)
    src = tmp_path / "src.dcm"
    write_mg_dicom(src, ph["image"].astype(np.uint16), spacing=0.07, laterality="R", view="MLO", seed=5,
                   patient_id="PX", use_imager_spacing=False)
    rng = np.random.default_rng(1)
    prob = rng.random((96, 80)).astype(np.float32)
    for thickness in (None, 42.5):
        ds = pydicom.dcmread(src)
        assert "PixelSpacing" in ds
        if thickness is not None:
            ds.BodyPartThickness = thickness
        for make, values in ((make_seg, prob > 0.9), (make_fractional_seg, prob)):
            f = tmp_path / f"{make.__name__}_{thickness}.dcm"
            make(ds, values, "t").save_as(f)
            seg = hd.seg.segread(f)
            got = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
            assert np.abs(got.astype(np.float64) - values).max() <= 0.5 / FRACTIONAL_MAX + 1e-6
            measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
            if thickness is None:
                assert measures is None
            else:
                assert [float(v) for v in measures[0].PixelSpacing] == [0.07, 0.07]
                assert float(measures[0].SliceThickness) == thickness


def test_pipeline_without_refinement_is_refused():
    from deploy.mcref_app.pipeline import PipelineOutputError, result_arrays

    with pytest.raises(PipelineOutputError, match="refine"):
        result_arrays({"prob": np.zeros((1, 4, 4)), "mask": np.zeros((1, 4, 4))}, (4, 4))
    d = {"refined_mask": np.full((1, 4, 4), 0.7), "refined_prob": np.full((1, 4, 4), 1.5), "mask": np.ones((1, 4, 4))}
    arr = result_arrays(d, (4, 4))
    assert arr["refined_mask"].dtype == np.uint8 and arr["refined_mask"].all() and float(arr["refined_prob"].max()) == 1.0
    with pytest.raises(PipelineOutputError, match="source grid"):
        result_arrays(d, (5, 4))


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


def _other_segai_weights(path: Path) -> Path:
    import torch

    from bundle.networks import SegAINet

    torch.manual_seed(1)
    torch.save(SegAINet(**_config_network_kwargs()).state_dict(), path)  # random weights: not models/model.pt
    return path


def test_other_segai_weights_without_onnx_tools_are_refused_up_front(tmp_path, monkeypatch):
    import shutil

    from scripts.export_bundle import NETWORKS, ExportError, build, onnx_source

    segai = [n for n in NETWORKS if n["name"] == "segai"]
    other = _other_segai_weights(tmp_path / "other.pt")
    same = tmp_path / "same.pt"
    shutil.copyfile(ROOT / "models" / "model.pt", same)
    assert onnx_source(ROOT, NETWORKS, {}) is None  # the shipped export fits the shipped weights
    assert onnx_source(ROOT, NETWORKS, {"network_def": same}) is None  # the same bytes elsewhere
    assert onnx_source(ROOT, NETWORKS, {"mcgenref_seg": other}) is None  # not SegAI's checkpoint
    assert onnx_source(ROOT, NETWORKS, {"network_def": other}) == other
    assert onnx_source(ROOT, NETWORKS, {"segai": other}) == other
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # importlib.util.find_spec -> None: "not installed"
    with pytest.raises(ExportError, match=r"models/model.onnx must be exported again.*pip install onnx onnxscript"):
        build(ROOT, tmp_path / "b.zip", {"network_def": other}, segai, verify=False)
    assert not (tmp_path / "b.zip").exists()


@pytest.mark.slow
def test_other_segai_weights_get_their_own_onnx_export(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    import hashlib

    from scripts.export_bundle import NETWORKS, build

    shipped = hashlib.sha256((ROOT / "models" / "model.onnx").read_bytes()).hexdigest()
    other = _other_segai_weights(tmp_path / "other.pt")
    segai = [n for n in NETWORKS if n["name"] == "segai"]
    report = build(ROOT, tmp_path / "b.zip", {"network_def": other}, segai, verify=True)
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        onnx_bytes = zf.read("mcref/models/model.onnx")
        assert zf.read("mcref/models/model.pt") == other.read_bytes()
    assert hashlib.sha256(onnx_bytes).hexdigest() != shipped
    assert report["onnx"]["ckpt_file"] == str(other) and report["onnx"]["filepath"] == "models/model.onnx"
    if __import__("importlib").util.find_spec("openvino") is not None:  # the export holds the other weights
        assert report["onnx"]["verified"] and report["onnx"]["max_abs_diff"] <= 1e-2
    assert hashlib.sha256((ROOT / "models" / "model.onnx").read_bytes()).hexdigest() == shipped  # left alone


def test_overrides_parse_and_protect_the_app_ids():
    from deploy.mcref_app.bundle_io import BundleError, parse_override

    assert parse_override("refined_threshold=0.7") == ("refined_threshold", 0.7)
    assert parse_override("device=cpu") == ("device", "cpu")
    assert parse_override("genai_kwargs#crop_sizes=[24, 32]") == ("genai_kwargs#crop_sizes", [24, 32])
    for bad in ("novalue", "=1", "bundle_root=/x", "output_dir=/tmp"):
        with pytest.raises(BundleError):
            parse_override(bad)


def test_derived_uids_are_deterministic():
    from bundle.dicom import derived_uid

    a = derived_uid("1.2.3", "seg", "0.1.0")
    assert a == derived_uid("1.2.3", "seg", "0.1.0")
    assert a != derived_uid("1.2.3", "prob", "0.1.0") and a != derived_uid("1.2.3", "seg", "0.2.0")


# ------------------------------------------------------------------ the app, run once
@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict:
    pytest.importorskip("monai.deploy.core", reason="monai-deploy-app-sdk is not installed (pip install -e '.[deploy]')")
    tmp = tmp_path_factory.mktemp("deploy")
    archive = tmp / "mcref_bundle.zip"
    run([sys.executable, "scripts/export_bundle.py", "--output", str(archive)])
    good = tmp / "good"
    good.mkdir()
    right = write_good(good, "right_mlo.dcm", "R", "MLO", "MONOCHROME1", seed=11, patient="P1")
    left = write_good(good, "left_cc.dcm", "L", "CC", "MONOCHROME2", seed=11, patient="P1")
    run_dir = tmp_path_factory.mktemp("app_run")
    inp = run_dir / "in"
    (inp / "nested").mkdir(parents=True)
    (inp / right.name).write_bytes(right.read_bytes())
    (inp / "nested" / left.name).write_bytes(left.read_bytes())
    bad = write_bad_inputs(inp, left)
    write_variant(right, inp / "dotdot.dcm", "dotdot", uids=("..", ".."))
    (inp / "empty.dcm").write_bytes(b"")
    (inp / "notes.txt").write_text("not an image\n")
    before = {p: p.read_bytes() for p in files_under(inp)}
    out = run_dir / "out"
    app = run([sys.executable, "-m", "deploy.mcref_app", "-i", str(inp), "-o", str(out), "--bundle", str(archive),
               "-w", str(run_dir / "work")])
    ref = tmp / "ref"
    run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(good), "--output_dir", str(ref)])
    summary = json.loads((out / "summary.json").read_text())
    return {"archive": archive, "in": inp, "out": out, "run_dir": run_dir, "ref": ref, "good": [right, left],
            "bad": bad, "app": app, "before": before, "summary": summary}


def _instance(summary: dict, sop: str) -> dict:
    found = [i for s in summary["series"] for i in s["instances"] if i["sop_instance_uid"] == sop]
    assert len(found) == 1, sop
    return found[0]


@pytest.mark.slow
def test_archive_holds_the_deployable_bundle_only(deployed):
    with zipfile.ZipFile(deployed["archive"]) as zf:
        names = zf.namelist()
    assert all(n.startswith("mcref/") for n in names)
    rel = {n[len("mcref/"):] for n in names}
    for need in ("configs/inference.json", "configs/metadata.json", "models/model.ts", "models/model.pt",
                 "models/inpainter.pt", "bundle/__init__.py", "bundle/data.py", "bundle/dicom.py", "LICENSE",
                 "models/export.json"):
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
def test_seg_equals_the_bundles_refined_mask(deployed):
    """The product: the SEG holds the bundle's ``<stem>_refined_mask.nii.gz``, not SegAI's mask."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    differs_from_segai = 0
    for src in deployed["good"]:
        ds = pydicom.dcmread(src)
        rec = _instance(deployed["summary"], ds.SOPInstanceUID)
        seg = hd.seg.segread(rec["outputs"]["seg"])
        assert Path(rec["outputs"]["seg"]).parent.parent == deployed["out"]
        assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == 1
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
        refined = read_nii(deployed["ref"] / src.stem / f"{src.stem}_refined_mask.nii.gz")
        segai = read_nii(deployed["ref"] / src.stem / f"{src.stem}_mask.nii.gz")
        assert frame.shape == ds.pixel_array.shape == refined.shape
        assert np.array_equal(frame.astype(np.uint8), refined.astype(np.uint8)), f"{src.name}: SEG differs from the refined mask"
        assert rec["mask_pixels"] == int(refined.sum()) and rec["segai_mask_pixels"] == int(segai.sum())
        differs_from_segai += int(not np.array_equal(refined > 0, segai > 0))
        item = seg.SegmentSequence[0]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (codes.SCT.CalcificationOfBreast.value, "SCT")
        region = item.AnatomicRegionSequence[0]
        assert region.CodeValue == codes.SCT.Breast.value
        side = codes.SCT.Right if ds.ImageLaterality == "R" else codes.SCT.Left
        assert region.AnatomicRegionModifierSequence[0].CodeValue == side.value
        assert seg.Laterality == ds.ImageLaterality
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "mcref SegAI+R:GenAI"
        assert seg.StudyInstanceUID == ds.StudyInstanceUID and seg.PatientID == ds.PatientID
        refd = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert refd.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert differs_from_segai >= 1, "test images where the refinement changes nothing cannot tell the masks apart"
    assert sum(_instance(deployed["summary"], pydicom.dcmread(s).SOPInstanceUID)["mask_pixels"] for s in deployed["good"]) > 0


@pytest.mark.slow
def test_fractional_seg_holds_the_refined_probability(deployed):
    import highdicom as hd

    from bundle.dicom import FRACTIONAL_MAX

    peak = 0.0
    for src in deployed["good"]:
        ds = pydicom.dcmread(src)
        rec = _instance(deployed["summary"], ds.SOPInstanceUID)
        seg = hd.seg.segread(rec["outputs"]["prob"])
        assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
        assert int(seg.MaximumFractionalValue) == FRACTIONAL_MAX
        seg_bin = pydicom.dcmread(rec["outputs"]["seg"], stop_before_pixels=True)
        assert seg.SeriesInstanceUID != seg_bin.SeriesInstanceUID and seg.Laterality == ds.ImageLaterality
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
        ref = read_nii(deployed["ref"] / src.stem / f"{src.stem}_refined_prob.nii.gz")
        assert frame.shape == ref.shape
        peak = max(peak, float(ref.max()))
        assert np.abs(frame.astype(np.float64) - ref).max() <= 0.5 / FRACTIONAL_MAX + 1e-6
    assert peak > 0.5, "probability maps without any mark test little"


@pytest.mark.slow
def test_virtual_normal_is_a_derived_image_of_the_source(deployed):
    from pydicom.pixels import apply_modality_lut

    for src in deployed["good"]:
        ds = pydicom.dcmread(src)
        rec = _instance(deployed["summary"], ds.SOPInstanceUID)
        vn = pydicom.dcmread(rec["outputs"]["virtual_normal"])
        assert vn.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and list(vn.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        for kw in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
            assert vn.get(kw) == ds.get(kw), kw
        assert vn.Laterality == ds.ImageLaterality and (vn.Rows, vn.Columns) == (ds.Rows, ds.Columns)
        assert vn.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert vn.SeriesInstanceUID != ds.SeriesInstanceUID
        # the very object the bundle writes for a DICOM input
        ref_dcm = pydicom.dcmread(deployed["ref"] / src.stem / f"{src.stem}_virtual_normal.dcm")
        assert vn.SOPInstanceUID == ref_dcm.SOPInstanceUID
        assert np.array_equal(vn.pixel_array, ref_dcm.pixel_array)
        ref = read_nii(deployed["ref"] / src.stem / f"{src.stem}_virtual_normal.nii.gz")
        lo = float(vn.RescaleIntercept)
        hi = lo + float(vn.RescaleSlope) * 50000
        got = apply_modality_lut(vn.pixel_array, vn)
        assert np.abs(got - np.clip(ref, lo, hi)).max() <= float(vn.RescaleSlope)


@pytest.mark.slow
def test_every_input_file_is_accounted_for(deployed):
    out, summary = deployed["out"], deployed["summary"]
    expect = {
        "not_mg": "not a mammogram",
        "multi_frame": "multi-frame",
        "rgb": "colour",
        "no_spacing": "missing pixel spacing",
        "bad_syntax": "transfer syntax",
    }
    from bundle.dicom import safe_name

    for kind, suid in deployed["bad"].items():
        status = json.loads((out / safe_name(suid) / "status.json").read_text())
        assert status["status"] == "skipped", (kind, status)
        assert expect[kind] in status["reason"], (kind, status["reason"])
        assert not list((out / safe_name(suid)).glob("*.dcm")), f"{kind}: partial output written"
    inputs = {str(p) for p in files_under(deployed["in"])}
    sources = [i["source"] for s in summary["series"] for i in s["instances"]] + [f["source"] for f in summary["files_not_loaded"]]
    assert sorted(sources) == sorted(inputs), "every input file appears exactly once in summary.json"
    not_loaded = {Path(f["source"]).name: f["reason"] for f in summary["files_not_loaded"]}
    assert "empty" in not_loaded["empty.dcm"] and "not a DICOM file" in not_loaded["notes.txt"]
    assert summary["counts"] == {"ok": 3, "skipped": 7, "failed": 0, "files": len(inputs)}
    studies = {s["study_instance_uid"]: s for s in summary["studies"]}
    bad_study = pydicom.dcmread(deployed["in"] / "bad_not_mg.dcm").StudyInstanceUID
    assert studies[bad_study]["status"] == "skipped" and "without a usable breast" in studies[bad_study]["reason"]
    good_study = pydicom.dcmread(deployed["good"][0]).StudyInstanceUID
    assert studies[good_study]["status"] == "ok"
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert json.loads(deployed["app"].stdout.strip().splitlines()[-1]) == {"counts": summary["counts"]}


@pytest.mark.slow
def test_nothing_is_written_outside_the_output_folder(deployed):
    """A DICOM whose SeriesInstanceUID and SOPInstanceUID are ``..`` is processed, and its objects
    land in OUT under names of safe characters; the inputs are unchanged."""
    run_dir, out, inp = deployed["run_dir"], deployed["out"], deployed["in"]
    work = run_dir / "work"  # -w: the app's work folder (the unpacked bundle archive)
    outside = {p for p in files_under(run_dir) if not {out, inp, work} & set(p.parents)}
    assert not outside, f"written outside the output folder: {sorted(outside)}"
    assert {p: p.read_bytes() for p in files_under(inp)} == deployed["before"], "an input file changed"
    for p in files_under(out):
        for part in p.relative_to(out).parts:
            assert SAFE.match(part) and part not in (".", ".."), p
    rec = _instance(deployed["summary"], "..")
    assert rec["status"] == "ok" and set(rec["outputs"]) == {"seg", "prob", "virtual_normal"}
    for f in rec["outputs"].values():
        assert out in Path(f).parents and Path(f).parent != out and os.path.isfile(f)


def test_seg_algorithm_names_the_refinement_method():
    from bundle.dicom import ALGORITHM_NAME, algorithm_name

    assert algorithm_name(None) == algorithm_name("segai+genai") == ALGORITHM_NAME == "mcref SegAI+R:GenAI"
    assert algorithm_name("segai+sp1") == "mcref segai+sp1" and len(algorithm_name("x" * 200)) <= 64


def _config_network_kwargs() -> dict:
    """SegAI's architecture as configs/inference.json defines it (the shipped weights fit it)."""
    import json

    spec = json.loads((Path(__file__).resolve().parents[1] / "configs" / "inference.json").read_text())["network_def"]
    return {k: v for k, v in spec.items() if k != "_target_"}
