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

ROOT = Path(__file__).resolve().parents[1]


def bundle_run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
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
    bundle_run("--config_file", "configs/inference.json", "--dataset_dir", str(phantom_dir), "--output_dir", str(out),
               "--refiner", "None")
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["broken"]["status"] == "failed" and "broken.dcm" in rows["broken"]["error"]
    dicoms = sorted(p for p in phantom_dir.glob("case_*.dcm"))
    assert dicoms
    for f in dicoms:
        stem = f.stem
        assert rows[stem]["status"] == "ok", rows[stem]
        px = pydicom.dcmread(f).pixel_array
        prob = read_nii(out / stem / f"{stem}_prob.nii.gz")
        mask = read_nii(out / stem / f"{stem}_mask.nii.gz")
        assert prob.shape == px.shape and prob.dtype == np.float32
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask, (prob >= 0.5).astype(np.uint8)) or abs(int(mask.sum()) - int((prob >= 0.5).sum())) <= 2
        assert (out / stem / f"{stem}_overlay.png").stat().st_size > 1000
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
               "--refiner", "None", "--network", "$torch.nn.Identity()", "--threshold", "0.99")
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
        "--output_dir", str(tmp_path / "train_out"),
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
