"""End-to-end runs through ``python -m monai.bundle run`` (inference and a short training)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]


def bundle_run(*args: str, timeout: int = 600, expect: int = 0) -> subprocess.CompletedProcess:
    """Run the bundle command; ``expect`` is its exit status (1: some case failed, by design)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != expect:
        raise AssertionError(f"bundle run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def read_nii(path: Path) -> np.ndarray:
    return np.squeeze(np.asarray(nib.load(str(path)).dataobj))


def read_summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from bundle.phantom import make_dataset

    d = tmp_path_factory.mktemp("phantoms")
    make_dataset(d, n_cases=2, seed=31337, shape=(512, 416), splits=(0, 0, 2), progress=False)
    return d


@pytest.mark.slow
def test_inference_outputs_follow_the_contract(phantom_dir, tmp_path):
    out = tmp_path / "out"
    (phantom_dir / "broken.dcm").write_bytes(b"DICM but not really a DICOM file")
    before = {p.name: p.read_bytes() for p in phantom_dir.iterdir() if p.is_file()}
    p = bundle_run("--config_file", "configs/inference.json", "--dataset_dir", str(phantom_dir), "--output_dir", str(out),
                   "--refine", "False", expect=1)  # broken.dcm failed: the exit status says so
    assert "1 of 3 cases failed" in p.stderr
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["broken"]["status"] == "failed" and "broken.dcm" in rows["broken"]["error"]
    thr = float(json.loads((ROOT / "configs" / "inference.json").read_text())["threshold"])
    dicoms = sorted(p for p in phantom_dir.glob("case_*.dcm"))
    assert dicoms
    n_clustered = 0
    for f in dicoms:
        stem = f.stem
        assert rows[stem]["status"] == "ok", rows[stem]
        px = pydicom.dcmread(f).pixel_array
        prob = read_nii(out / stem / f"{stem}_prob.nii.gz")
        mask = read_nii(out / stem / f"{stem}_mask.nii.gz")
        assert prob.shape == px.shape and prob.dtype == np.float32
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        want = (prob >= thr).astype(np.uint8)  # the configured operating point
        assert np.array_equal(mask, want) or abs(int(mask.sum()) - int(want.sum())) <= 2
        assert (out / stem / f"{stem}_overlay.png").stat().st_size > 1000
        assert (out / stem / f"{stem}_clusters.png").stat().st_size > 200
        # clusters.csv: header always; clusters of the final mask (here the SegAI mask), on its grid
        with open(out / stem / f"{stem}_clusters.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            clusters = list(reader)
        assert reader.fieldnames == ["cluster", "centre_row", "centre_col", "n_marks", "extent_mm", "max_score"]
        n_marks = int(ndimage.label(mask, structure=np.ones((3, 3), int))[1])
        assert int(rows[stem]["marks"]) == n_marks and int(rows[stem]["clusters"]) == len(clusters)
        n_clustered += len(clusters)
        assert sum(int(c["n_marks"]) for c in clusters) <= n_marks
        assert [int(c["cluster"]) for c in clusters] == list(range(1, len(clusters) + 1))
        for c in clusters:
            assert int(c["n_marks"]) >= 3 and float(c["extent_mm"]) >= 0.0
            assert 0 <= float(c["centre_row"]) < px.shape[0] and 0 <= float(c["centre_col"]) < px.shape[1]
            assert thr <= float(c["max_score"]) <= float(prob.max())
        scores = [float(c["max_score"]) for c in clusters]
        assert scores == sorted(scores, reverse=True)  # strongest first
    assert n_clustered > 0, "no cluster on any phantom: the clusters.csv checks tested nothing"
    # inputs untouched
    after = {p.name: p.read_bytes() for p in phantom_dir.iterdir() if p.is_file() and p.name in before}
    assert after == before


@pytest.mark.slow
def test_right_monochrome1_maps_index_like_the_pixel_array(tmp_path):
    """A right-laterality MONOCHROME1 image: prob[r, c] must belong to pixel_array[r, c].

    The network is replaced by the identity so that the probability is sigmoid(normalised
    image): its brightest point must sit where the displayed image is densest.
    """
    from bundle.phantom import make_phantom, write_mg_dicom

    ph = make_phantom(shape=(400, 320), view="CC", laterality="R", seed=5, with_mcs=False, traps=False)
    img = ph["image"].astype(np.int32)
    r0, c0 = 150, 250  # inside a right breast (chest wall on the right)
    assert ph["breast"][r0, c0]
    img[r0 - 3 : r0 + 4, c0 - 3 : c0 + 4] = 16000  # a bright (dense) square
    inp = tmp_path / "in"
    inp.mkdir()
    write_mg_dicom(inp / "right.dcm", img.astype(np.uint16), spacing=0.07, laterality="R", view="CC", photometric="MONOCHROME1")
    px = pydicom.dcmread(inp / "right.dcm").pixel_array  # stored MONOCHROME1: the square is dark here
    assert px[r0, c0] < px.max()
    out = tmp_path / "out"
    bundle_run("--config_file", "configs/inference.json", "--dataset_dir", str(inp), "--output_dir", str(out),
               "--refine", "False", "--network", "$torch.nn.Identity()", "--threshold", "0.99")
    prob = read_nii(out / "right" / "right_prob.nii.gz")
    assert prob.shape == px.shape
    r, c = np.unravel_index(np.argmax(prob), prob.shape)
    assert abs(r - r0) <= 3 and abs(c - c0) <= 3, (r, c)
    # the mirrored position is not bright
    assert prob[r0, px.shape[1] - 1 - c0] < prob[r0, c0]


@pytest.mark.slow
def test_two_iteration_training_through_the_bundle_config(tmp_path):
    ckpt = tmp_path / "models"
    bundle_run(
        "--config_file", "configs/train_segai.json",
        "--dataset_dir", str(tmp_path / "data"),
        "--ckpt_dir", str(ckpt),
        "--output_dir", str(tmp_path / "train_out"), "--tracking_store", str(tmp_path / "mlruns"),
        "--n_cases", "3", "--phantom_splits", "[2, 1, 0]", "--phantom_shape", "[256, 256]",
        "--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1",
        "--num_samples", "2", "--patch_size", "[64, 64]",
    )
    saved = list(ckpt.glob("*.pt"))
    assert saved, "training wrote no checkpoint"
    import torch

    state = torch.load(saved[0], map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in (state.get("network", state)))
    rows = list(csv.DictReader(open(tmp_path / "train_out" / "val_metrics.csv")))
    assert len(rows) == 1 and "dice" in rows[0]
    recipe = json.loads((tmp_path / "data" / "recipe.json").read_text())
    assert recipe["n_cases"] == 3


@pytest.mark.slow
def test_evaluate_config_logs_to_a_real_mlflow_server(mlflow_server, tmp_path):
    """configs/evaluate.json on two held-out phantoms, tracked by a real server, read back."""
    import os

    import torch
    from mlflow.tracking import MlflowClient

    from bundle.networks import SegAINet

    ckpt = ROOT / "models" / "model.pt"
    if not ckpt.exists():  # a fresh checkout always has it; this keeps the test meaningful without
        torch.manual_seed(0)
        ckpt = tmp_path / "model.pt"
        torch.save(SegAINet(**_config_network_kwargs()).state_dict(), ckpt)
    out = tmp_path / "eval"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate.json",
           "--dataset_dir", str(tmp_path / "heldout"), "--n_cases", "2", "--phantom_shape", "[512, 416]",
           "--output_dir", str(out), "--ckpt_path", str(ckpt), "--experiment_name", "mcref_test_eval"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    rows = list(csv.DictReader(open(out / "segai" / "per_case.csv")))
    assert len(rows) == 2
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("mcref_test_eval")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    m = run.data.metrics
    for name in ("dice", "sensitivity", "ppv", "activation_rate", "true_activation_rate", "object_detection_rate"):
        assert name in m, sorted(m)
    # the logged averages are the means of the per-case rows
    for name in ("dice", "activation_rate", "true_activation_rate"):
        vals = [float(r[name]) for r in rows if r[name] not in ("", "nan")]
        assert m[name] == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    assert run.data.params["method"] == "segai"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_case.csv", "config.json"} <= arts, arts
    cfg = json.loads(open(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read())
    assert cfg["n_cases"] == 2 and cfg["experiment_name"] == "mcref_test_eval"


def test_metadata_and_network_shapes_verify_offline():
    """verify_metadata against the schema copy shipped in docs/, and verify_net_in_out."""
    for args in (
        ["verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "docs/monai_meta_schema_20240725.json"],
        ["verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json",
         "--config_file", "configs/inference.json"],
    ):
        p = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        text = p.stdout + p.stderr
        assert p.returncode == 0, text[-3000:]
        assert "verified with no error" in text


@pytest.mark.slow
def test_virtual_normal_dicom_has_the_source_geometry_and_identifiers(tmp_path):
    """DICOM input + refinement: <stem>_virtual_normal.dcm lies on the source grid, keeps patient and
    study, is a new instance referencing the source, and holds the NIfTI's values."""
    from bundle.phantom import make_phantom, write_mg_dicom

    ph = make_phantom(shape=(512, 416), view="MLO", laterality="R", seed=8)
    inp = tmp_path / "in"
    inp.mkdir()
    write_mg_dicom(inp / "rmlo.dcm", ph["image"].astype(np.uint16), spacing=0.07, laterality="R", view="MLO",
                   photometric="MONOCHROME1")
    before = (inp / "rmlo.dcm").read_bytes()
    out = tmp_path / "out"
    bundle_run("--config_file", "configs/inference.json", "--dataset_dir", str(inp), "--output_dir", str(out))
    src = pydicom.dcmread(inp / "rmlo.dcm")
    vn = pydicom.dcmread(out / "rmlo" / "rmlo_virtual_normal.dcm")
    assert (inp / "rmlo.dcm").read_bytes() == before
    assert (vn.Rows, vn.Columns) == (src.Rows, src.Columns)
    assert vn.SOPInstanceUID != src.SOPInstanceUID and vn.SeriesInstanceUID != src.SeriesInstanceUID
    assert vn.StudyInstanceUID == src.StudyInstanceUID and vn.PatientID == src.PatientID
    assert (vn.get("ImageLaterality") or vn.get("Laterality")) == "R"
    assert vn.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    spacing = src.get("PixelSpacing") or src.get("ImagerPixelSpacing")
    assert [float(v) for v in vn.PixelSpacing] == pytest.approx([float(v) for v in spacing])
    values = vn.pixel_array * float(vn.RescaleSlope) + float(vn.RescaleIntercept)
    nii = np.clip(read_nii(out / "rmlo" / "rmlo_virtual_normal.nii.gz"), -0.5, 1.5)
    assert np.abs(values - nii).max() <= 2.0 / 50000 + 1e-6
    refined = read_nii(out / "rmlo" / "rmlo_refined_mask.nii.gz")
    assert refined.shape == src.pixel_array.shape


def test_bundle_version_reads_the_metadata(tmp_path):
    from bundle.engine import bundle_version

    assert bundle_version(ROOT) == json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]
    assert bundle_version(tmp_path) == "unversioned"


def _config_network_kwargs() -> dict:
    """SegAI's architecture as configs/inference.json defines it (the shipped weights fit it)."""
    import json

    spec = json.loads((Path(__file__).resolve().parents[1] / "configs" / "inference.json").read_text())["network_def"]
    return {k: v for k, v in spec.items() if k != "_target_"}
