"""Where the pipeline loses MCs (bundle.image_metrics.loss_stages), the MCs' local contrast-to-noise,
and the validation sweep's ``--stages`` / ``--contrast`` tables."""

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from bundle.image_metrics import LOSS_STAGES, local_contrast_to_noise, loss_stages

ROOT = Path(__file__).resolve().parents[1]


def _six_mcs():
    """Six 4 x 4 MCs (0.28 mm at 0.07 mm), each lost at a different stage, and one 1-pixel MC."""
    shape = (40, 40)
    truth, prob, hole, refined, final = (np.zeros(shape, bool), np.zeros(shape, np.float32), np.zeros(shape, bool),
                                         np.zeros(shape, np.float32), np.zeros(shape, bool))
    boxes = [(2, 2), (10, 10), (20, 20), (30, 30), (2, 30), (30, 2)]
    for r, c in boxes:
        truth[r:r + 4, c:c + 4] = True
    truth[20, 2] = True  # 1 pixel = 0.08 mm: not an included object
    prob[10:14, 10:14] = 0.1  # below the candidates
    prob[20:24, 20:24] = 0.5  # a candidate the hole control did not keep
    for r, c in [(30, 30), (2, 30), (30, 2)]:
        prob[r:r + 4, c:c + 4] = 0.9
        hole[r:r + 4, c:c + 4] = True
    refined[30:34, 30:34] = 0.3  # below the refined threshold
    refined[2:6, 30:34] = 0.9  # refined, then removed (size limit)
    refined[30:34, 2:6] = 0.9
    final[30:34, 2:6] = True  # found
    return truth, final, prob, hole, refined


def test_each_mc_is_counted_once_at_the_stage_that_lost_it():
    counts = loss_stages(*_six_mcs(), spacing_mm=0.07)
    assert counts == {"found": 1, "segai_mask": 1, "candidates": 1, "hole_control": 1, "refined": 1, "size_limit": 1}
    # the 1-pixel MC counts once it is included
    counts = loss_stages(*_six_mcs(), spacing_mm=0.07, min_diameter_mm=0.0)
    assert sum(counts.values()) == 7 and counts["segai_mask"] == 2


def test_stages_follow_the_thresholds():
    truth, final, prob, hole, refined = _six_mcs()
    # a lower candidate threshold moves the 0.1 MC from "candidates" to "hole_control"
    counts = loss_stages(truth, final, prob, hole, refined, candidate_threshold=0.05)
    assert counts["candidates"] == 0 and counts["hole_control"] == 2
    # a refined threshold of 0.3 keeps the 0.3 MC past the refinement (it is then a size-limit loss)
    counts = loss_stages(truth, final, prob, hole, refined, refined_threshold=0.3)
    assert counts["refined"] == 0 and counts["size_limit"] == 2
    # refined values outside the hole do not count
    refined2 = refined.copy()
    refined2[10:14, 10:14] = 1.0
    assert loss_stages(truth, final, prob, hole, refined2)["candidates"] == 1


def test_loss_stages_rejects_mismatched_shapes_and_handles_no_truth():
    truth, final, prob, hole, refined = _six_mcs()
    with pytest.raises(ValueError, match="hole shape"):
        loss_stages(truth, final, prob, hole[:-1], refined)
    empty = loss_stages(np.zeros_like(truth), final, prob, hole, refined)
    assert set(empty) == set(LOSS_STAGES) and sum(empty.values()) == 0


def test_contrast_to_noise_finds_a_spot_above_the_noise_and_ignores_the_scale():
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (96, 96)).astype(np.float32)
    x[40:42, 50:52] += 8.0
    cnr = local_contrast_to_noise(x)
    spot = cnr[40:42, 50:52].max()
    away = np.ones_like(cnr, bool)
    away[30:52, 40:62] = False
    assert spot > np.percentile(cnr[away], 99.9)
    # a window/level change of the image (a * x + b) leaves the ratio unchanged
    np.testing.assert_allclose(local_contrast_to_noise(3.0 * x + 7.0), cnr, rtol=1e-3, atol=1e-3)
    # a flat image has no noise: 0, not NaN
    assert np.all(local_contrast_to_noise(np.ones((16, 16))) == 0)
    with pytest.raises(ValueError, match="radius_px"):
        local_contrast_to_noise(x, radius_px=0)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from bundle.phantom import make_dataset

    d = tmp_path_factory.mktemp("sweep")
    make_dataset(d / "val_phantoms", n_cases=2, seed=4242, shape=(512, 416), splits=(0, 0, 2), progress=False)
    cmd = [sys.executable, "scripts/sweep_operating_point.py", str(d / "val_phantoms"), "--cache", str(d / "cache"),
           "--cluster", "100", "--candidate", "0.2", "--max-diameter", "1.0", "--stages", "--contrast"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return d, p.stdout


def test_sweep_stage_table_accounts_for_every_mc(swept):
    import nibabel as nib

    d, out = swept
    n_obj = 0
    for lab in sorted((d / "val_phantoms").glob("*_label.nii.gz")):
        t = np.asarray(nib.load(str(lab)).dataobj) > 0
        tl, n = ndimage.label(t, np.ones((3, 3), bool))
        sizes = np.bincount(tl.ravel())[1:]
        n_obj += int((2 * np.sqrt(sizes * 0.07 * 0.07 / np.pi) >= 0.2 - 1e-9).sum())
    assert n_obj > 0
    main = re.search(r"\| (\d+)/(\d+) = [\d.]+ %, [\d.]+\s*$", out, re.M)
    assert main and int(main.group(2)) == n_obj
    row = re.search(r"^\s*0\.2 \|\s+100 \| -\s+\| phantom \| ([\d |]+) \| (\d+)/(\d+)$", out, re.M)
    assert row, out
    counts = [int(v) for v in row.group(1).split("|")]
    assert int(row.group(2)) <= int(row.group(3))  # false hole marks kept <= false hole marks
    assert len(counts) == len(LOSS_STAGES) and sum(counts) == n_obj
    assert counts[0] == int(main.group(1))  # "found" is the main table's detected MCs
    cnr = re.search(r"phantom: found (\d+): .*; missed (\d+)", out)
    assert cnr and int(cnr.group(1)) + int(cnr.group(2)) == n_obj
    assert re.search(r"phantom: tissue 99\.9th percentile [\d.]+, 99\.99th [\d.]+", out)
    # the contrast values went into the cache, so a rerun only scores
    recs = [pickle.load(open(f, "rb")) for f in sorted((d / "cache").glob("*.pkl"))]
    assert len(recs) == 2 and all(r["cnr_truth"].shape == r["truth"].shape for r in recs)


def test_crop_gallery_draws_rows_of_outlined_crops(tmp_path):
    from PIL import Image

    from bundle.figures import crop_gallery

    rng = np.random.default_rng(0)
    crop = rng.normal(size=(33, 33)).astype(np.float32)
    mark = np.zeros((33, 33), bool)
    mark[15:18, 15:18] = True
    out = crop_gallery({"false marks": [(crop, mark, "a")] * 3, "MCs": [(crop, None, "b")]}, tmp_path / "g.png")
    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.shape[0] > 100 and im.shape[1] > 300
    # the outline is drawn in red
    assert ((im[..., 0] > 200) & (im[..., 1] < 80) & (im[..., 2] < 80)).any()
    with pytest.raises(ValueError, match="no rows"):
        crop_gallery({}, tmp_path / "h.png")
