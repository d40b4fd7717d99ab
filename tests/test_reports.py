"""Overlay outlines, cluster zoom panels and the per-case clusters.csv written by inference."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from bundle.engine import CLUSTER_COLUMNS, MammogramInference
from bundle.reports import PANEL_HEADER_PX, PANEL_SPACING_PX, _dilate, cluster_panels_png, cluster_panels_rgb, outline, overlay_png, overlay_rgb

RED = (255, 0, 0)


def _is_red(rgb: np.ndarray) -> np.ndarray:
    return np.all(rgb == RED, axis=-1)


def _is_grey(px: np.ndarray) -> bool:
    return int(px[0]) == int(px[1]) == int(px[2])


# ------------------------------------------------------------------------------------------
# outline drawing
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7])
def test_sparse_dilation_matches_maximum_filter(size):
    rng = np.random.default_rng(size)
    m = rng.random((37, 41)) > 0.97
    m[0, 0] = m[-1, -1] = m[0, -1] = True  # borders
    assert np.array_equal(_dilate(m, size), ndimage.maximum_filter(m, size=size))


def test_outline_ring_leaves_the_mark_and_its_neighbours_free():
    m = np.zeros((21, 21), bool)
    m[10, 10] = True
    ring = outline(m, gap=1, width=2)
    r, c = np.nonzero(ring)
    dist = np.maximum(np.abs(r - 10), np.abs(c - 10))
    assert set(dist) == {2, 3}  # chessboard distance 2..3 only
    assert ring.sum() == 7 * 7 - 3 * 3  # the full ring, no gaps
    # two marks close together: no ring pixel lands on (or next to) either of them
    m[10, 13] = True
    ring = outline(m, gap=1, width=2)
    assert not (ring & ndimage.binary_dilation(m, np.ones((3, 3), bool))).any()
    assert ring[10, 16] and ring[10, 7]


def test_overlay_outline_keeps_the_speck_grey_and_colours_a_ring(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random((40, 50)).astype(np.float32)
    image[20, 25] = 0.37  # a speck with a mid grey value (not clipped)
    pred = np.zeros((40, 50), bool)
    pred[20, 25] = True
    plain = overlay_rgb(image, None)
    path = tmp_path / "o" / "x_overlay.png"
    overlay_png(image, pred, None, path, style="outline")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert rgb.shape == (40, 50, 3)
    # the pixel under the mark and its direct neighbours keep their grey value
    assert np.array_equal(rgb[19:22, 24:27], plain[19:22, 24:27])
    assert _is_grey(rgb[20, 25]) and 0 < rgb[20, 25, 0] < 255
    # a ring around it is red, and nothing else is
    red = _is_red(rgb)
    for rr, cc in ((18, 25), (22, 25), (20, 23), (20, 27), (17, 22), (23, 28)):
        assert red[rr, cc], (rr, cc)
    r, c = np.nonzero(red)
    assert np.maximum(np.abs(r - 20), np.abs(c - 25)).max() <= 3 and red.sum() == 40
    assert os.listdir(path.parent) == ["x_overlay.png"]  # atomic: no temporary left behind
    # the default is unchanged (other callers rely on a filled mark)
    filled = overlay_rgb(image, pred)
    assert tuple(filled[20, 25]) == RED and not _is_red(filled[18, 25])
    with pytest.raises(ValueError, match="style"):
        overlay_rgb(image, pred, style="dots")


def test_overlay_outline_when_downsampled_rings_the_mark():
    image = np.full((800, 400), 0.5, np.float32)
    image[::2] = 0.4
    pred = np.zeros((800, 400), bool)
    pred[401, 203] = True
    rgb = overlay_rgb(image, pred, max_side=100, style="outline")
    assert rgb.shape == (100, 50, 3)
    red = _is_red(rgb)
    assert red.any()
    r, c = np.nonzero(red)
    # centred on the mark's output pixel, which itself stays grey
    assert abs(r.mean() - 401 / 8) <= 1.0 and abs(c.mean() - 203 / 8) <= 1.0
    assert _is_grey(rgb[401 // 8, 203 // 8])


# ------------------------------------------------------------------------------------------
# cluster zoom panels
# ------------------------------------------------------------------------------------------
def test_cluster_panels_are_full_resolution_crops():
    rng = np.random.default_rng(2)
    image = rng.random((600, 500)).astype(np.float32)
    mask = np.zeros((600, 500), bool)
    mask[300, 250] = True
    clusters = [{"cluster": 1, "centre_row": 300.0, "centre_col": 250.0, "n_marks": 3, "extent_mm": 2.0,
                 "max_score": 0.9}]
    rgb = cluster_panels_rgb(image, mask, clusters, crop=64, zoom=1, levels=(0.0, 1.0))
    grey = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    # one panel below its header: the window rows 268..331, cols 218..281, one screen pixel per source pixel
    y0, x0 = PANEL_SPACING_PX + PANEL_HEADER_PX, PANEL_SPACING_PX
    assert rgb.shape == (y0 + 64 + PANEL_SPACING_PX, x0 + 64 + PANEL_SPACING_PX, 3)
    panel = rgb[y0 : y0 + 64, x0 : x0 + 64]
    red = _is_red(panel)
    assert np.array_equal(panel[..., 1][~red], grey[268:332, 218:282][~red])  # not resampled
    assert panel[32, 32, 0] == grey[300, 250]  # the speck itself stays grey
    assert red[30, 32] and red[32, 35] and red.sum() == 40  # ring around it

    zoomed = cluster_panels_rgb(image, mask, clusters, crop=64, zoom=2, levels=(0.0, 1.0))
    assert zoomed.shape[0] > rgb.shape[0] + 60 and zoomed.shape[1] > rgb.shape[1] + 60


def test_cluster_panels_at_the_border_and_without_clusters(tmp_path):
    image = np.zeros((100, 80), np.float32)
    image[50:, :] = 1.0
    mask = np.zeros((100, 80), bool)
    clusters = [{"cluster": k, "centre_row": 2.0, "centre_col": 79.0, "n_marks": 3, "extent_mm": 1.0,
                 "max_score": 0.5} for k in range(1, 7)]
    rgb = cluster_panels_rgb(image, mask, clusters, crop=256, zoom=1, levels=(0.0, 1.0))
    # at most 4 panels in 2 columns, each the whole (smaller) image
    assert rgb.shape[1] < 2 * 256 + 20 and rgb.shape[0] < 2 * (256 + 40) + 20
    white = np.all(rgb == 255, axis=-1)
    assert white.sum() >= 4 * 50 * 80  # the lower half of the image in each of the 4 panels
    assert white.sum() < 5 * 50 * 80 + 500  # (text is yellow, not white)
    path = tmp_path / "none.png"
    cluster_panels_png(image, mask, [], path)
    none = np.asarray(Image.open(path).convert("RGB"))
    assert none.shape[0] < 100 and none.shape[1] <= 256  # a small "no clusters" picture
    assert (none != none[0, 0]).any()  # with its text


# ------------------------------------------------------------------------------------------
# write_case: clusters.csv, summary row, pictures
# ------------------------------------------------------------------------------------------
def _meta_tensor(a: np.ndarray, spacing=(0.1, 0.1)):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(a, dtype=torch.float32)[None], meta={"spacing": spacing})


def _runner(out) -> MammogramInference:
    return MammogramInference(None, str(out), preprocessing=lambda d: d, inferer=lambda *a, **k: None,
                              network=torch.nn.Identity(), progress=False)


def _case(h=400, w=300, refined=True):
    """3 marks 1 mm apart (10 px at 0.1 mm) in a column, an isolated mark 20 mm away, a SegAI-only mark."""
    rng = np.random.default_rng(3)
    image = rng.normal(0.5, 0.05, (h, w)).astype(np.float32)
    mask = np.zeros((h, w), np.float32)
    prob = np.zeros((h, w), np.float32)
    rmask = np.zeros((h, w), np.float32)
    rprob = np.zeros((h, w), np.float32)
    marks = [(100, 50), (110, 50), (120, 50)]  # the cluster
    for i, (r, c) in enumerate(marks):
        rmask[r : r + 2, c : c + 2] = 1  # 2x2 marks: centre at (r + 0.5, c + 0.5)
        rprob[r : r + 2, c : c + 2] = 0.7
        rprob[r, c] = 0.8 + 0.05 * i  # 0.9 at the last one
        prob[r : r + 2, c : c + 2] = 0.95  # SegAI's probability is higher: must not be the score
    rmask[300, 250] = 1  # isolated
    rprob[300, 250] = 0.99
    mask[:] = rmask
    mask[60, 200] = 1  # only in the SegAI mask: with refinement it is not a mark
    prob[60, 200] = 0.5
    d = {"image": _meta_tensor(image), "prob": _meta_tensor(prob), "mask": _meta_tensor(mask),
         "_output_keys": ["prob", "mask"]}
    if refined:
        d.update(refined_prob=_meta_tensor(rprob), refined_mask=_meta_tensor(rmask),
                 _output_keys=["prob", "mask", "refined_prob", "refined_mask"])
    return d


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_write_case_clusters_csv_on_a_hand_built_case(tmp_path):
    runner = _runner(tmp_path / "out")
    row = runner.write_case("c1", _case(), tmp_path / "c1.dcm")
    case_dir = tmp_path / "out" / "c1"
    header, rows = _read_csv(case_dir / "c1_clusters.csv")
    assert header == list(CLUSTER_COLUMNS)
    assert len(rows) == 1  # the isolated mark and the SegAI-only mark are no cluster
    cl = rows[0]
    assert int(cl["cluster"]) == 1 and int(cl["n_marks"]) == 3
    assert float(cl["centre_row"]) == pytest.approx(110.5) and float(cl["centre_col"]) == pytest.approx(50.5)
    assert float(cl["extent_mm"]) == pytest.approx(2.0)  # 20 px at 0.1 mm
    assert float(cl["max_score"]) == pytest.approx(0.9)  # refined_prob, not prob (0.95), not the lone 0.99
    assert row["marks"] == 4 and row["clusters"] == 1
    assert row["refined_mask_pixels"] == 13 and row["mask_pixels"] == 14
    # the pictures, and no temporary files
    assert {p.name for p in case_dir.iterdir()} == {
        "c1_prob.nii.gz", "c1_mask.nii.gz", "c1_refined_prob.nii.gz", "c1_refined_mask.nii.gz",
        "c1_clusters.csv", "c1_overlay.png", "c1_clusters.png"}
    ov = np.asarray(Image.open(case_dir / "c1_overlay.png").convert("RGB"))
    assert ov.shape == (400, 300, 3)
    assert _is_grey(ov[300, 250]) and _is_red(ov[300, 252]).all()  # outlined, not filled
    assert _is_grey(ov[60, 200]) and not _is_red(ov[58:63, 198:203]).any()  # SegAI-only: not final
    panels = np.asarray(Image.open(case_dir / "c1_clusters.png").convert("RGB"))
    assert panels.shape[0] >= 2 * 256 and panels.shape[1] >= 2 * 256  # one 256 px window, zoomed x2


def test_write_case_spacing_and_segai_only(tmp_path):
    runner = _runner(tmp_path / "out")
    d = _case(refined=False)
    d["image"] = _meta_tensor(d["image"][0].numpy(), spacing=(0.5, 0.5))  # marks 5 mm apart: still linked
    row = runner.write_case("c2", d, tmp_path / "c2.dcm")
    _, rows = _read_csv(tmp_path / "out" / "c2" / "c2_clusters.csv")
    assert row["marks"] == 5 and len(rows) == 1
    assert float(rows[0]["extent_mm"]) == pytest.approx(10.0)
    assert float(rows[0]["max_score"]) == pytest.approx(0.95)  # prob of the SegAI mask
    d["image"] = _meta_tensor(d["image"][0].numpy(), spacing=(0.6, 0.6))  # 6 mm apart: no cluster
    row = runner.write_case("c3", d, tmp_path / "c3.dcm")
    header, rows = _read_csv(tmp_path / "out" / "c3" / "c3_clusters.csv")
    assert header == list(CLUSTER_COLUMNS) and rows == [] and row["clusters"] == 0 and row["marks"] == 5


def test_write_case_empty_mask_writes_a_header_only_csv(tmp_path):
    runner = _runner(tmp_path / "out")
    d = _case()
    d["refined_mask"] = _meta_tensor(np.zeros((400, 300), np.float32))
    row = runner.write_case("e", d, tmp_path / "e.dcm")
    case_dir = tmp_path / "out" / "e"
    text = (case_dir / "e_clusters.csv").read_text().strip().splitlines()
    assert text == [",".join(CLUSTER_COLUMNS)]
    assert row["marks"] == 0 and row["clusters"] == 0
    none = np.asarray(Image.open(case_dir / "e_clusters.png").convert("RGB"))
    assert none.shape[0] < 100  # the "no clusters" picture
