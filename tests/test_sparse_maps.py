"""The sparse map helpers (issue 15) give what the whole-image routines they replace give.

The refinement labels candidates, dilates holes, plans inpainting crops and drops large marks on
the few thousand pixels SegAI marks, not on the whole view; these tests pin that each sparse
route equals the dense one (``ndimage.label``, ``binary_dilation``, ``find_objects``), so the
shipped maps did not change with the speed-up.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage
from scipy.stats import rankdata
from skimage.morphology import disk

from bundle.clusters import dilate_indices, drop_large_marks, grow_marks, pixel_components
from bundle.falsealarm import FalseAlarmControl, candidate_scores
from bundle.inpainting import inpaint_crops, plan_hole_crops
from bundle.refine_maps import classical_inpaint_fn, genai_refine


def _speckle(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    return rng.random(shape) < density


@pytest.mark.parametrize("connectivity", [1, 2])
def test_pixel_components_match_ndimage_label(connectivity):
    rng = np.random.default_rng(connectivity)
    for density in (0.02, 0.2, 0.6):
        m = _speckle(rng, (57, 43), density)
        lab, n = ndimage.label(m, ndimage.generate_binary_structure(2, connectivity))
        idx = np.flatnonzero(m)
        comp, k = pixel_components(idx, m.shape, connectivity)
        assert k == n
        assert np.array_equal(comp + 1, lab.ravel()[idx])  # same numbering: raster order


def test_pixel_components_edges_and_errors():
    # pixels on the right border must not link to the next row's first column
    m = np.zeros((4, 5), bool)
    m[0, 4] = m[1, 0] = True
    comp, k = pixel_components(np.flatnonzero(m), m.shape, 2)
    assert k == 2 and comp.tolist() == [0, 1]
    assert pixel_components(np.zeros(0, np.int64), (3, 3))[1] == 0
    with pytest.raises(ValueError, match="sorted"):
        pixel_components(np.array([5, 2]), (3, 3))


@pytest.mark.parametrize("radius", [0, 1, 2, 4])
def test_dilate_indices_match_binary_dilation(radius):
    rng = np.random.default_rng(radius)
    m = _speckle(rng, (41, 37), 0.02)
    m[0, 0] = m[-1, -1] = True  # corners: the disk leaves the grid
    ref = ndimage.binary_dilation(m, disk(radius)) if radius else m
    assert np.array_equal(dilate_indices(np.flatnonzero(m), m.shape, radius), np.flatnonzero(ref))


def test_false_alarm_control_sparse_equals_dense_labelling():
    rng = np.random.default_rng(3)
    g = ndimage.gaussian_filter(rng.random((300, 260)), 1.0)
    prob = (rankdata(g.ravel()) / g.size).reshape(g.shape).astype(np.float32)  # uniform scores, smooth blobs
    prob[10, 10] = np.nan  # never a candidate
    breast = np.zeros(prob.shape, bool)
    breast[:, :200] = True
    ctl = FalseAlarmControl(expected_false_marks=3, candidate_threshold=0.95, min_threshold=0.95,
                            cluster_false_marks=30, fit_ranks=(5, 40), spacing_mm=0.07)
    out = ctl(prob, breast)
    labels, scores = candidate_scores(prob, 0.95, breast)
    keep, t, _ = ctl.select(labels, scores)
    dense = np.concatenate([[False], keep])[labels]
    assert scores.size > 40  # the tail fit ran, so the threshold is the image's own
    assert out["threshold"] == pytest.approx(t)
    assert 0 < out["n_marks"] < scores.size
    assert np.array_equal(out["mask"], dense)
    assert np.array_equal(out["indices"], np.flatnonzero(dense))
    assert not out["mask"][:, 200:].any()


def test_drop_large_marks_keeps_small_and_drops_large():
    m = np.zeros((60, 60), bool)
    m[5:7, 5:7] = True  # 4 px: 0.16 mm at 0.07 mm
    m[20:40, 20:40] = True  # 400 px: far over 1 mm
    m[59, 59] = True
    out = drop_large_marks(m, 1.0, 0.07)
    assert out[5:7, 5:7].all() and out[59, 59] and not out[20:40, 20:40].any()
    assert out.sum() == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grow_marks_is_hysteresis_and_adds_no_mark(seed):
    from skimage.filters import apply_hysteresis_threshold

    x = ndimage.gaussian_filter(np.random.default_rng(seed).random((80, 90)), 1.5)
    lo, hi = np.quantile(x, [0.7, 0.95])
    # 4-connected, strict thresholds: exactly scikit-image's hysteresis
    np.testing.assert_array_equal(grow_marks(x > hi, x > lo, connectivity=1), apply_hysteresis_threshold(x, lo, hi))
    grown = grow_marks(x > hi, x > lo)
    lab, n = ndimage.label(grown, np.ones((3, 3)))
    assert n > 0 and set(np.unique(lab[x > hi])) == set(range(1, n + 1))  # every grown mark holds a seed
    assert (grown >= (x > hi)).all() and not (grown & ~(x > lo) & ~(x > hi)).any()
    assert not grow_marks(np.zeros_like(grown), x > lo).any()
    with pytest.raises(ValueError, match="one shape"):
        grow_marks(x > hi, (x > lo)[:10])


def test_plan_hole_crops_one_crop_per_component_in_label_order():
    hole = np.zeros((256, 256), bool)
    hole[200:203, 30:33] = True
    hole[10:12, 100:104] = True
    hole[100:160, 100:160] = True  # larger than every crop size: grid tiles
    crops = plan_hole_crops(hole, crop_sizes=(24, 32), context=6, tile=64, overlap=0.25)
    # ndimage.label numbers the top component first; its crop comes first
    assert crops[0][2] == 24 and crops[0][0] <= 10 and crops[0][1] <= 100
    covered = np.zeros_like(hole)
    for r, c, s in crops:
        covered[r + 6 : r + s - 6, c + 6 : c + s - 6] = True
    assert covered[hole].all()


def test_inpaint_crops_changes_only_hole_pixels():
    rng = np.random.default_rng(5)
    img = torch.as_tensor(rng.normal(size=(200, 180)).astype(np.float32))
    hole = torch.zeros(200, 180, dtype=torch.bool)
    hole[50:53, 60:62] = True
    hole[150:152, 20:23] = True

    def net(x, h):  # a stand-in inpainter: the crop's mean where the hole is
        return torch.where(h > 0.5, x.mean(dim=(2, 3), keepdim=True), x)

    out = inpaint_crops(net, img, hole, crop_sizes=(24,), context=6, tile=64, overlap=0.25)
    assert torch.equal(out[~hole], img[~hole])
    assert not torch.equal(out[hole], img[hole])


def test_genai_refine_sparse_hole_and_difference():
    rng = np.random.default_rng(7)
    img = rng.normal(0, 0.01, size=(128, 128)).astype(np.float32)
    img[60:63, 60:63] += 0.5  # a bright speck
    seg = np.zeros_like(img)
    seg[61, 61] = 0.9
    out = genai_refine(img, seg, classical_inpaint_fn("biharmonic"), threshold=0.5, dilation_px=2)
    assert np.array_equal(out["hole"], ndimage.binary_dilation(seg >= 0.5, disk(2)))
    assert out["prob"][61, 61] > 0.9  # the speck stands out of its inpainted surroundings
    assert not out["prob"][~out["hole"]].any()
    assert np.array_equal(out["virtual_normal"][~out["hole"]], img[~out["hole"]])
    bad = img.copy()
    bad[0, 0] = np.nan
    with pytest.warns(UserWarning, match="non-finite"):
        out2 = genai_refine(bad, seg, classical_inpaint_fn("biharmonic"), threshold=0.5, dilation_px=2)
    assert np.isfinite(out2["virtual_normal"]).all()


@pytest.mark.parametrize("slope,intercept", [(1, 0), (2, -100)])
def test_dicom_modality_rescale_is_applied_or_skipped_exactly(tmp_path, slope, intercept):
    from bundle.phantomio import write_mg_dicom
    from bundle.readers import _read_pixels

    pixels = (np.arange(128 * 96).reshape(128, 96) % 4000).astype(np.uint16)
    path = tmp_path / "x.dcm"
    write_mg_dicom(path, pixels, spacing=0.07, laterality="L", view="CC")
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(path)
    arr, _ = _read_pixels(path)
    assert arr.dtype == np.float32
    assert np.array_equal(arr, (stored * slope + intercept).astype(np.float32))
