"""Tests of bundle.metrics (pure metrics, ignite handler, ActivationRate) and bundle.reports."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from bundle.metrics import (
    CURVE_COLUMNS,
    ActivationRate,
    MCMetricsHandler,
    aggregate,
    cluster_stats,
    curve_summary,
    detection_curve,
    interpolate_tpr,
    object_iou,
    object_stats,
    pixel_stats,
    pool_detection_curves,
    truth_clusters,
)
from bundle.reports import markdown_table, overlay_png, overlay_rgb, write_csv_atomic

nan = float("nan")


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-12, nan_ok=True)


# ------------------------------------------------------------------------------------------
# pixel_stats
# ------------------------------------------------------------------------------------------
def _hand_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.zeros((4, 5), bool)
    truth = np.zeros((4, 5), bool)
    breast = np.zeros((4, 5), bool)
    breast[:, :4] = True  # 16 breast pixels, column 4 is background
    pred[0, 0] = pred[0, 1] = pred[2, 2] = pred[3, 4] = True  # (3, 4) outside the breast
    truth[0, 0] = truth[1, 0] = truth[2, 2] = True
    return pred, truth, breast


def test_pixel_stats_hand_case_with_breast():
    pred, truth, breast = _hand_case()
    s = pixel_stats(pred, truth, breast)
    # tp {(0,0),(2,2)}, fp {(0,1),(3,4)}, fn {(1,0)}; tn inside breast = 16 - 4 = 12; fp in breast = 1
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (2, 2, 1, 12)
    assert (s["pred_px"], s["truth_px"], s["breast_px"]) == (4, 3, 16)
    assert s["dice"] == approx(4 / 7)
    assert s["sensitivity"] == approx(2 / 3)
    assert s["ppv"] == approx(0.5)
    assert s["activation_rate"] == approx(3 / 16)
    assert s["true_activation_rate"] == approx(3 / 16)
    assert s["fnr"] == approx(1 / 3)
    assert s["specificity"] == approx(12 / 13)
    assert s["balanced_accuracy"] == approx((2 / 3 + 12 / 13) / 2)
    assert s["g_mean"] == approx(math.sqrt(2 / 3 * 12 / 13))


def test_pixel_stats_without_breast_uses_whole_image():
    pred, truth, _ = _hand_case()
    s = pixel_stats(torch.from_numpy(pred[None].astype(np.uint8)), truth[None].astype(np.float32))
    assert s["tn"] == 15 and s["breast_px"] == 20
    assert s["activation_rate"] == approx(4 / 20)
    assert s["true_activation_rate"] == approx(3 / 20)
    assert s["specificity"] == approx(15 / 17)


def test_pixel_stats_both_empty():
    z = np.zeros((3, 3), np.uint8)
    s = pixel_stats(z, z)
    assert s["dice"] == 1.0
    assert math.isnan(s["sensitivity"]) and math.isnan(s["ppv"]) and math.isnan(s["fnr"])
    assert s["activation_rate"] == 0.0 and s["true_activation_rate"] == 0.0
    assert s["specificity"] == 1.0
    assert math.isnan(s["balanced_accuracy"]) and math.isnan(s["g_mean"])


def test_pixel_stats_empty_truth():
    pred = np.zeros((3, 3), bool)
    pred[1, 1] = True
    s = pixel_stats(pred, np.zeros((3, 3), bool))
    assert s["dice"] == 0.0 and s["ppv"] == 0.0
    assert math.isnan(s["sensitivity"]) and math.isnan(s["g_mean"])
    assert s["activation_rate"] == approx(1 / 9) and s["specificity"] == approx(8 / 9)


def test_pixel_stats_empty_prediction():
    truth = np.zeros((3, 3), bool)
    truth[0, 0] = True
    s = pixel_stats(np.zeros((3, 3), bool), truth)
    assert s["dice"] == 0.0 and s["sensitivity"] == 0.0 and s["fnr"] == 1.0
    assert math.isnan(s["ppv"])
    assert s["g_mean"] == 0.0 and s["balanced_accuracy"] == approx(0.5)


def test_pixel_stats_empty_breast_and_bad_shapes():
    pred, truth, _ = _hand_case()
    s = pixel_stats(pred, truth, np.zeros_like(pred))
    assert math.isnan(s["activation_rate"]) and math.isnan(s["specificity"])
    with pytest.raises(ValueError):
        pixel_stats(pred, truth[:, :4])
    with pytest.raises(ValueError):
        pixel_stats(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


# ------------------------------------------------------------------------------------------
# object_stats
# ------------------------------------------------------------------------------------------
def _objects_case() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((10, 10), bool)
    truth[1, 1] = True  # 1 px, diameter 0.1128 mm at 0.1 mm
    truth[1, 8] = truth[2, 9] = True  # diagonal pair: one object with 8-connectivity, 0.1596 mm
    truth[5:7, 5:7] = True  # 2x2 block, 0.2257 mm
    pred = np.zeros((10, 10), bool)
    pred[1, 1] = True  # hits the single pixel
    pred[2, 9] = True  # one pixel touches the diagonal pair
    pred[4, 5] = True  # next to the block but not inside it: a false-positive object
    pred[8, 1] = pred[8, 2] = True  # false-positive object
    return pred, truth


def test_object_stats_detection_and_fp_objects():
    pred, truth = _objects_case()
    s = object_stats(pred, truth, spacing_mm=0.1)
    assert s["n_objects_all"] == 3 and s["n_objects"] == 3
    assert s["n_detected"] == 2 and s["detection_rate"] == approx(2 / 3)
    assert s["image_detected"] == 1.0
    assert s["n_pred_objects"] == 4 and s["n_fp_objects"] == 2
    by_size = {o["size_px"]: o for o in s["objects"]}
    assert by_size[1]["detected"] and by_size[2]["detected"] and not by_size[4]["detected"]
    assert by_size[1]["diameter_mm"] == approx(2 * math.sqrt(0.01 / math.pi))
    assert by_size[4]["diameter_mm"] == approx(2 * math.sqrt(0.04 / math.pi))
    assert (by_size[4]["centroid_row"], by_size[4]["centroid_col"]) == (5.5, 5.5)


@pytest.mark.parametrize(
    "min_d, n_obj, n_det, rate",
    [(0.15, 2, 1, 0.5), (0.2, 1, 0, 0.0), (1.0, 0, 0, nan), (2 * math.sqrt(0.02 / math.pi), 2, 1, 0.5)],
)
def test_object_stats_diameter_filter(min_d, n_obj, n_det, rate):
    pred, truth = _objects_case()
    s = object_stats(pred, truth, spacing_mm=(0.1, 0.1), min_diameter_mm=min_d)
    assert (s["n_objects"], s["n_detected"]) == (n_obj, n_det)
    assert s["detection_rate"] == approx(rate)
    assert s["n_objects_all"] == 3
    expected_image = nan if n_obj == 0 else float(n_det > 0)
    assert s["image_detected"] == approx(expected_image)


def test_object_stats_connectivity_size_filter_spacing_densities():
    pred, truth = _objects_case()
    assert object_stats(pred, truth, 0.1, connectivity=1)["n_objects_all"] == 4
    s = object_stats(pred, truth, 0.1, max_size_px=2)
    assert (s["n_objects"], s["n_detected"]) == (2, 2)
    s = object_stats(pred, truth, (0.1, 0.2))
    assert min(o["diameter_mm"] for o in s["objects"]) == approx(2 * math.sqrt(0.02 / math.pi))
    image = np.full((10, 10), 2.0)
    image[truth] = 10.0
    s = object_stats(pred, truth, 0.1, image=image, ring_px=1)
    for o in s["objects"]:
        assert o["interior_density"] == 10.0 and o["exterior_density"] == 2.0
    empty = object_stats(np.zeros((4, 4)), np.zeros((4, 4)), 0.07)
    assert empty["n_objects"] == 0 and math.isnan(empty["detection_rate"]) and empty["objects"] == []
    with pytest.raises(ValueError):
        object_stats(pred, truth, 0.0)


# ------------------------------------------------------------------------------------------
# aggregate
# ------------------------------------------------------------------------------------------
def test_aggregate_nanmean_and_pooled():
    rows = [
        {"case": "a", "dice": 0.5, "sensitivity": nan, "n_objects": 3, "n_detected": 1, "tp": 1, "fp": 1, "fn": 1},
        {"case": "b", "dice": 1.0, "sensitivity": 0.25, "n_objects": 1, "n_detected": 1, "tp": 3, "fp": 0, "fn": 1},
        {"case": "c", "dice": 0.0, "sensitivity": nan, "n_objects": 0, "n_detected": 0, "tp": 0, "fp": 2, "fn": 0},
    ]
    a = aggregate(rows)
    assert "case" not in a
    assert a["n_cases"] == 3
    assert a["dice"] == approx(0.5)
    assert a["sensitivity"] == approx(0.25)
    assert a["object_detection_rate_pooled"] == approx(2 / 4)
    assert a["dice_pooled"] == approx(8 / (8 + 3 + 2))
    assert math.isnan(aggregate([{"x": nan}])["x"])


def test_aggregate_pools_clusters_iou_and_fp_per_cm2():
    rows = [
        {"n_truth_clusters": 2, "n_detected_clusters": 1, "n_fp_objects": 3, "breast_area_cm2": 2.0,
         "object_iou": 0.5, "n_objects_all": 4, "object_iou_detected": 1.0, "n_detected_all": 2},
        {"n_truth_clusters": 0, "n_detected_clusters": 0, "n_fp_objects": 1, "breast_area_cm2": 2.0,
         "object_iou": nan, "n_objects_all": 0, "object_iou_detected": nan, "n_detected_all": 0},
        {"n_truth_clusters": 1, "n_detected_clusters": 1, "n_fp_objects": 0, "breast_area_cm2": 4.0,
         "object_iou": 0.25, "n_objects_all": 2, "object_iou_detected": 0.5, "n_detected_all": 1},
    ]
    a = aggregate(rows)
    assert a["cluster_sensitivity_pooled"] == approx(2 / 3)  # the image without a truth cluster adds nothing
    assert a["fp_marks_per_cm2_pooled"] == approx(4 / 8)
    assert a["object_iou_pooled"] == approx((0.5 * 4 + 0.25 * 2) / 6)  # over objects, not images
    assert a["object_iou_detected_pooled"] == approx((1.0 * 2 + 0.5 * 1) / 3)
    assert math.isnan(aggregate(rows[1:2])["cluster_sensitivity_pooled"])
    assert math.isnan(aggregate(rows[1:2])["object_iou_pooled"])
    assert "cluster_sensitivity_pooled" not in aggregate([{"dice": 1.0}])


# ------------------------------------------------------------------------------------------
# detection metrics: object IoU, clusters, sweeps
# ------------------------------------------------------------------------------------------
def test_object_iou_hand_values():
    truth = np.zeros((8, 10), bool)
    pred = np.zeros((8, 10), bool)
    truth[1:3, 1:3] = True  # A: 4 px, predicted with one extra column: IoU 4 / 6
    pred[1:3, 1:4] = True
    truth[5, 1] = True  # B: missed, IoU 0
    truth[4:7, 5] = True  # C: 3 px, one predicted pixel inside: IoU 1 / 3
    pred[5, 5] = True
    truth[0, 7] = truth[0, 9] = True  # D, E: one 3 px component spans both: IoU 1 / 3 each
    pred[0, 7:10] = True
    s = object_iou(pred, truth)
    assert s["n_objects"] == 5 and s["n_detected"] == 4
    assert np.allclose(sorted(s["iou"]), sorted([4 / 6, 0.0, 1 / 3, 1 / 3, 1 / 3]))
    assert s["object_iou"] == approx((4 / 6 + 3 / 3) / 5)  # undetected counts as 0
    assert s["object_iou_detected"] == approx((4 / 6 + 3 / 3) / 4)
    assert object_iou(truth, truth)["object_iou"] == 1.0
    empty_pred = object_iou(np.zeros_like(pred), truth)
    assert empty_pred["object_iou"] == 0.0 and math.isnan(empty_pred["object_iou_detected"])
    assert empty_pred["n_detected"] == 0
    empty_truth = object_iou(pred, np.zeros_like(truth))
    assert empty_truth["n_objects"] == 0
    assert math.isnan(empty_truth["object_iou"]) and math.isnan(empty_truth["object_iou_detected"])
    # 4-connectivity splits nothing here but the diagonal pair below
    diag_t = np.zeros((3, 3), bool)
    diag_t[0, 0] = diag_t[1, 1] = True
    assert object_iou(diag_t, diag_t, connectivity=1)["n_objects"] == 2
    with pytest.raises(ValueError):
        object_iou(pred, truth[:, :5])


def _row_of_marks(step_px: int, n: int = 3, width: int = 40) -> np.ndarray:
    m = np.zeros((10, width), bool)
    for i in range(n):
        m[5, 4 + i * step_px] = True
    return m


@pytest.mark.parametrize("step_px, n_clusters", [(8, 1), (10, 1), (12, 0)])
def test_three_marks_cluster_at_4mm_and_5mm_not_at_6mm(step_px, n_clusters):
    """0.5 mm pixels: marks 8 px (4 mm) or 10 px (5 mm, the link is inclusive) apart cluster; 12 px
    (6 mm) apart they do not. On an image without MCs every mark and every cluster is false."""
    marks = _row_of_marks(step_px)
    empty = np.zeros_like(marks)
    s = cluster_stats(marks, empty, 0.5)
    assert s["n_pred_clusters"] == n_clusters and s["n_fp_clusters"] == n_clusters
    assert s["n_truth_clusters"] == 0 and s["n_detected_clusters"] == 0 and math.isnan(s["cluster_sensitivity"])
    assert object_stats(marks, empty, 0.5)["n_fp_objects"] == 3
    # the same marks as truth: a truth cluster (or not), found by the identical prediction
    same = cluster_stats(marks, marks, 0.5)
    assert same["n_truth_clusters"] == n_clusters and same["n_detected_clusters"] == n_clusters
    assert same["n_fp_clusters"] == 0
    assert same["cluster_sensitivity"] == approx(1.0 if n_clusters else nan)
    _, ids, n_tc = truth_clusters(marks, 0.5)
    assert n_tc == n_clusters and ids.tolist() == ([0, 0, 0] if n_clusters else [-1, -1, -1])
    # two marks are never a cluster
    assert cluster_stats(_row_of_marks(step_px, n=2), empty, 0.5)["n_pred_clusters"] == 0


def test_cluster_stats_empty_prediction_and_hit_rule():
    truth = _row_of_marks(8)  # a truth cluster of 3 MCs at 4 mm
    none = cluster_stats(np.zeros_like(truth), truth, 0.5)
    assert (none["n_pred_clusters"], none["n_fp_clusters"], none["n_truth_clusters"], none["n_detected_clusters"]) == (
        0, 0, 1, 0)
    assert none["cluster_sensitivity"] == 0.0
    # a predicted cluster hitting one MC of it (two marks beside the truth) detects it ...
    pred = np.zeros_like(truth)
    pred[5, 4] = True
    pred[2, 8] = pred[2, 14] = True
    s = cluster_stats(pred, truth, 0.5)
    assert s["n_pred_clusters"] == 1 and s["n_detected_clusters"] == 1 and s["n_fp_clusters"] == 0
    # ... unless two hit MCs are asked for
    assert cluster_stats(pred, truth, 0.5, min_hit_mcs=2)["n_detected_clusters"] == 0
    # a larger link merges the 6 mm marks into one cluster
    assert cluster_stats(_row_of_marks(12), np.zeros_like(truth), 0.5, link_mm=6.0)["n_fp_clusters"] == 1


def _sweep_cases() -> list[dict]:
    """Two 100 x 100 images at 0.1 mm (see test_detection_curve_pooled_froc_and_tpr)."""
    a_truth = np.zeros((100, 100), bool)
    a_prob = np.zeros((100, 100), np.float32)
    for col, p in ((10, 0.9), (30, 0.9), (50, 0.4)):  # a truth cluster: 3 MCs 2 mm apart
        a_truth[10:12, col:col + 2] = True
        a_prob[10:12, col:col + 2] = p
    a_truth[90, 90] = True  # a 1 px MC (0.11 mm): outside the >= 0.2 mm TPR, never detected
    a_prob[80:82, 80:82] = 0.7  # false marks
    a_prob[80, 10] = 0.3
    b_truth = np.zeros((100, 100), bool)  # no MC
    b_prob = np.zeros((100, 100), np.float32)
    for col in (20, 40, 60):  # a false cluster of 3 marks 2 mm apart
        b_prob[20, col] = 0.6
    b_prob[70, 70] = 0.95
    b_breast = np.zeros((100, 100), bool)
    b_breast[:80] = True  # 0.8 cm^2
    return [
        {"prob": a_prob, "truth": a_truth, "breast": np.ones((100, 100), bool), "stem": "a"},
        {"prob": b_prob, "truth": b_truth, "breast": b_breast, "stem": "b"},
    ]


def test_detection_curve_pooled_froc_and_tpr():
    thr = [0.25, 0.5, 0.8]
    a, b = (detection_curve(c["prob"], c["truth"], 0.1, thr, c["breast"], min_diameter_mm=0.2) for c in _sweep_cases())
    assert a["n_objects"] == 3 and a["n_truth_clusters"] == 1 and a["breast_area_cm2"] == approx(1.0)
    assert a["detected_objects"].tolist() == [3, 2, 2]
    assert a["fp_marks"].tolist() == [2, 1, 0]
    assert a["pred_marks"].tolist() == [5, 3, 2]
    assert a["detected_clusters"].tolist() == [1, 0, 0]  # two found MCs are no cluster
    assert a["fp_clusters"].tolist() == [0, 0, 0]
    assert b["n_objects"] == 0 and b["n_truth_clusters"] == 0 and b["breast_area_cm2"] == approx(0.8)
    assert b["fp_marks"].tolist() == [4, 4, 1] and b["fp_clusters"].tolist() == [1, 1, 0]
    # the operating point of the sweep is what cluster_stats / object_stats give on the mask
    for case, curve in zip(_sweep_cases(), (a, b)):
        mask = case["prob"] >= 0.5
        cs = cluster_stats(mask, case["truth"], 0.1)
        assert (cs["n_fp_clusters"], cs["n_detected_clusters"]) == (curve["fp_clusters"][1], curve["detected_clusters"][1])
        assert object_stats(mask, case["truth"], 0.1)["n_fp_objects"] == curve["fp_marks"][1]

    pooled = pool_detection_curves([a, b])
    assert set(pooled) == set(CURVE_COLUMNS)
    assert pooled["cluster_sensitivity"].tolist() == [1.0, 0.0, 0.0]
    assert pooled["fp_clusters_per_image"].tolist() == [0.5, 0.5, 0.0]
    assert np.allclose(pooled["object_tpr"], [1.0, 2 / 3, 2 / 3])
    assert pooled["fp_marks_per_image"].tolist() == [3.0, 2.5, 0.5]
    assert np.allclose(pooled["fp_marks_per_cm2"], [6 / 1.8, 5 / 1.8, 1 / 1.8])

    summ = curve_summary(pooled, (0.25, 0.5, 1, 2, 4), (0.1, 0.5, 1.0, 3.0, 5.0))
    # FROC: at <= 0.25 FP clusters per image only the 0.8 point (sensitivity 0) qualifies
    assert summ["froc_sens_at_0.25"] == 0.0 and summ["froc_sens_at_0.5"] == 1.0 and summ["froc_sens_at_4"] == 1.0
    assert summ["froc_score"] == approx(0.8)
    # TPR vs FP/cm^2 through (0, 0), (5/9, 2/3), (25/9, 2/3), (30/9, 1)
    assert summ["tpr_at_0.1_fp_per_cm2"] == approx(0.1 / (5 / 9) * 2 / 3)
    assert summ["tpr_at_0.5_fp_per_cm2"] == approx(0.6)
    assert summ["tpr_at_1_fp_per_cm2"] == approx(2 / 3)
    assert summ["tpr_at_3_fp_per_cm2"] == approx(2 / 3 + 0.4 / 3)
    assert summ["tpr_at_5_fp_per_cm2"] == approx(1.0)

    # only calcification-free images: every mark and cluster is false, sensitivities undefined
    normal = curve_summary(pool_detection_curves([b]))
    assert math.isnan(normal["froc_score"]) and math.isnan(normal["tpr_at_0.5_fp_per_cm2"])
    other_grid = detection_curve(_sweep_cases()[1]["prob"], _sweep_cases()[1]["truth"], 0.1, [0.5])
    with pytest.raises(ValueError):
        pool_detection_curves([a, other_grid])


def test_interpolate_tpr():
    assert np.allclose(interpolate_tpr([0.2, 1.0], [0.5, 0.9], [0.1, 0.5, 1.0, 2.0]), [0.25, 0.65, 0.9, 0.9])
    # order does not matter; a point worse than a cheaper one is lifted to the best TPR at or below its rate
    assert np.allclose(interpolate_tpr([1.0, 0.5], [0.4, 0.6], [0.25, 0.75, 1.0]), [0.3, 0.6, 0.6])
    # a point at zero false positives replaces the (0, 0) anchor; NaN points are ignored
    assert np.allclose(interpolate_tpr([0.0, 1.0, nan], [0.5, 1.0, 0.9], [0.0, 0.5]), [0.5, 0.75])
    assert np.isnan(interpolate_tpr([nan], [0.5], [0.1])).all()
    assert np.isnan(interpolate_tpr([], [], [0.1, 1.0])).all()
    with pytest.raises(ValueError):
        interpolate_tpr([0.1, 0.2], [0.5], [0.1])


# ------------------------------------------------------------------------------------------
# handler in a real ignite engine
# ------------------------------------------------------------------------------------------
def _fake_cases() -> list[dict]:
    from monai.data import MetaTensor

    breast = torch.ones(1, 8, 8)
    breast[..., 7] = 0  # 56 breast pixels
    # case A: single-pixel MC at (2,2) (detected), 2x2 MC at (5,5) (missed, prob 0.4), FP at (0,6)
    label_a = torch.zeros(1, 8, 8)
    label_a[0, 2, 2] = 1
    label_a[0, 5:7, 5:7] = 1
    prob_a = torch.zeros(1, 8, 8)
    prob_a[0, 2, 2] = 0.9
    prob_a[0, 0, 6] = 0.6
    prob_a[0, 5, 5] = 0.4
    # case B: no MC, one false-positive pixel at (3,3)
    label_b = torch.zeros(1, 8, 8)
    prob_b = torch.zeros(1, 8, 8)
    prob_b[0, 3, 3] = 0.7
    cases = []
    for stem, label, prob in (("caseA", label_a, prob_a), ("caseB", label_b, prob_b)):
        meta = {"filename_or_obj": f"/data/{stem}.dcm", "stem": stem, "spacing": (0.1, 0.1), "original_shape": (8, 8)}
        image = MetaTensor(torch.rand(1, 8, 8), meta=meta)
        cases.append({"image": image, "label": label, "breast": breast.clone(), "prob": prob})
    return cases


# hand-computed per-case numbers (threshold 0.5, min diameter 0.2 mm at 0.1 mm spacing)
EXPECTED = {
    # IoU: the single-pixel MC is predicted exactly (1), the 2x2 one is missed (0); two marks never
    # make a cluster; 56 breast pixels of 0.01 mm^2 are 0.0056 cm^2
    "caseA": {"tp": 1, "fp": 1, "fn": 4, "dice": 2 / 7, "sensitivity": 1 / 5, "ppv": 1 / 2,
              "activation_rate": 2 / 56, "true_activation_rate": 5 / 56, "n_objects": 1, "n_detected": 0,
              "object_detection_rate": 0.0, "n_fp_objects": 1, "n_detected_all": 1, "object_iou": 0.5,
              "object_iou_detected": 1.0, "n_pred_clusters": 0, "n_fp_clusters": 0, "n_truth_clusters": 0,
              "cluster_sensitivity": nan, "breast_area_cm2": 0.0056, "fp_marks_per_cm2": 1 / 0.0056},
    "caseB": {"tp": 0, "fp": 1, "fn": 0, "dice": 0.0, "sensitivity": nan, "ppv": 0.0,
              "activation_rate": 1 / 56, "true_activation_rate": 0.0, "n_objects": 0, "n_detected": 0,
              "object_detection_rate": nan, "n_fp_objects": 1, "n_detected_all": 0, "object_iou": nan,
              "object_iou_detected": nan, "n_fp_clusters": 0, "fp_marks_per_cm2": 1 / 0.0056},
}
EXPECTED_SUMMARY = {
    "dice": 1 / 7, "sensitivity": 1 / 5, "ppv": 0.25, "activation_rate": 3 / 112,
    "true_activation_rate": 5 / 112, "object_detection_rate": 0.0, "object_detection_rate_pooled": 0.0,
    "image_detection_rate": 0.0, "fp_objects_per_image": 1.0, "fp_marks_per_image": 1.0,
    "fp_clusters_per_image": 0.0, "cluster_sensitivity_pooled": nan, "object_iou_pooled": 0.5,
    "object_iou_detected_pooled": 1.0, "fp_marks_per_cm2_pooled": 2 / 0.0112,
}


def _collated_engine() -> tuple[Engine, list]:
    """Batch size 2: collated dict batch, dict of batched tensors as output."""
    from monai.data import list_data_collate

    cases = _fake_cases()
    batch = list_data_collate([{k: v for k, v in c.items() if k != "prob"} for c in cases])
    probs = torch.stack([c["prob"] for c in cases])

    def step(engine, b):
        return {"pred": probs}

    return Engine(step), [batch]


def _decollated_engine() -> tuple[Engine, list]:
    """Batch size 1, MONAI decollate=True style: list of dicts for batch and output."""
    cases = _fake_cases()

    def step(engine, b):
        engine.state.batch = [{k: v for k, v in b.items() if k != "prob"}]
        return [{"pred": b["prob"], "image": b["image"], "label": b["label"]}]

    return Engine(step), cases


@pytest.mark.parametrize("make_engine", [_collated_engine, _decollated_engine])
def test_handler_in_engine(tmp_path, make_engine):
    engine, data = make_engine()
    csv_path = tmp_path / "metrics" / "per_case.csv"
    handler = MCMetricsHandler(
        threshold=0.5,
        min_diameter_mm=0.2,
        csv_path=csv_path,
        overlay_dir=tmp_path / "ov",
        max_overlays=1,
        prefix="val_",
        objects_csv_path=tmp_path / "objects.csv",
    )
    handler.attach(engine)
    engine.run(data, max_epochs=1)

    for key, value in EXPECTED_SUMMARY.items():
        assert engine.state.metrics[f"val_{key}"] == approx(value), key
        assert handler.summary[key] == approx(value), key
    assert [r["case"] for r in handler.rows] == ["caseA", "caseB"]

    with open(csv_path, newline="") as f:
        table = {r["case"]: r for r in csv.DictReader(f)}
    assert set(table) == {"caseA", "caseB"}
    for case, expected in EXPECTED.items():
        assert table[case]["filename"] == f"/data/{case}.dcm"
        assert float(table[case]["spacing_row_mm"]) == 0.1
        for key, value in expected.items():
            assert float(table[case][key]) == approx(value), (case, key)
    assert not [p for p in os.listdir(csv_path.parent) if p != "per_case.csv"]  # no temp files left
    assert sorted(os.listdir(tmp_path / "ov")) == ["caseA_overlay.png"]
    with open(tmp_path / "objects.csv", newline="") as f:
        objects = list(csv.DictReader(f))
    assert [(o["case"], o["size_px"], o["detected"], o["included"]) for o in objects] == [
        ("caseA", "1", "True", "False"),  # 0.113 mm < 0.2 mm
        ("caseA", "4", "False", "True"),
    ]


def test_handler_sweep_logs_cluster_froc_tpr_and_writes_the_curve(tmp_path):
    """The two images of test_detection_curve_pooled_froc_and_tpr through the handler in an engine."""
    from monai.data import MetaTensor

    data = []
    for c in _sweep_cases():
        meta = {"stem": c["stem"], "spacing": (0.1, 0.1), "original_shape": (100, 100)}
        data.append({"image": MetaTensor(torch.zeros(1, 100, 100), meta=meta), "label": torch.as_tensor(c["truth"])[None],
                     "breast": torch.as_tensor(c["breast"])[None], "prob": torch.as_tensor(c["prob"])[None]})

    def step(engine, b):
        engine.state.batch = [{k: v for k, v in b.items() if k != "prob"}]
        return [{"pred": b["prob"], "label": b["label"]}]

    engine = Engine(step)
    handler = MCMetricsHandler(
        threshold=0.25, min_diameter_mm=0.2, sweep_thresholds=[0.5, 0.8], fp_per_cm2_rates=[0.1, 0.5],
        csv_path=tmp_path / "per_case.csv", curve_csv_path=tmp_path / "curve.csv", prefix="val_",
    )
    handler.attach(engine)
    engine.run(data, max_epochs=1)
    m = engine.state.metrics
    # operating point 0.25: a has the detected truth cluster and 2 false marks, b a false cluster and 4
    assert [(r["n_truth_clusters"], r["n_detected_clusters"], r["n_fp_clusters"], r["n_fp_objects"]) for r in handler.rows] == [
        (1, 1, 0, 2), (0, 0, 1, 4)]
    assert m["val_cluster_sensitivity_pooled"] == 1.0 and m["val_fp_clusters_per_image"] == 0.5
    assert m["val_fp_marks_per_image"] == 3.0 and m["val_fp_marks_per_cm2_pooled"] == approx(6 / 1.8)
    assert m["val_froc_score"] == approx(0.8) and m["val_froc_sens_at_0.25"] == 0.0
    assert m["val_tpr_at_0.1_fp_per_cm2"] == approx(0.12) and m["val_tpr_at_0.5_fp_per_cm2"] == approx(0.6)
    with open(tmp_path / "curve.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert list(curve[0]) == list(CURVE_COLUMNS)
    assert [float(r["threshold"]) for r in curve] == [0.25, 0.5, 0.8]
    assert [float(r["cluster_sensitivity"]) for r in curve] == [1.0, 0.0, 0.0]
    assert [float(r["fp_marks"]) for r in curve] == [6.0, 5.0, 1.0]
    with open(tmp_path / "per_case.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["fp_marks_per_cm2"]) for r in table] == approx([2.0, 5.0]) and table[1]["n_fp_clusters"] == "1"
    # without the sweep no curve entries appear, the per-case clusters stay
    plain = MCMetricsHandler(threshold=0.25)
    for d in data:
        plain.add_case(d["prob"], d["label"], d["breast"], meta=d["image"].meta)
    s = plain.compute()
    assert "froc_score" not in s and plain.curves == [] and s["cluster_sensitivity_pooled"] == 1.0


def test_handler_resets_each_epoch_and_works_without_breast():
    engine, data = _decollated_engine()
    handler = MCMetricsHandler(breast_key=None)
    handler.attach(engine)
    engine.run(data, max_epochs=2)
    assert len(handler.rows) == 2
    assert engine.state.metrics["activation_rate"] == approx((2 / 64 + 1 / 64) / 2)


def test_activation_rate_metric():
    engine, data = _decollated_engine()
    ActivationRate().attach(engine, "act")
    ActivationRate(breast_key=None).attach(engine, "act_whole")
    ActivationRate(output_transform=lambda o: ([x["pred"] for x in o], [x["label"] for x in o]), threshold=0.8).attach(
        engine, "act_high"
    )
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["act"] == approx(3 / 112)
    assert engine.state.metrics["act_whole"] == approx(3 / 128)
    assert engine.state.metrics["act_high"] == approx(1 / 112)

    collated, batch = _collated_engine()
    ActivationRate().attach(collated, "act")
    collated.run(batch, max_epochs=1)
    assert collated.state.metrics["act"] == approx(3 / 112)


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------
def test_overlay_png_colours(tmp_path):
    image = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    pred = np.zeros((20, 30), bool)
    pred[5, 7] = True
    truth = np.zeros((20, 30), bool)
    truth[10, 10] = True
    path = tmp_path / "o" / "x_overlay.png"
    overlay_png(image, pred, truth, path)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert rgb.shape == (20, 30, 3)
    assert tuple(rgb[5, 7]) == (255, 0, 0)
    assert tuple(rgb[9, 10]) == (0, 255, 0) and tuple(rgb[11, 11]) == (0, 255, 0)
    assert rgb[10, 10, 0] == rgb[10, 10, 1] == rgb[10, 10, 2]  # missed MC: grey inside a green ring
    assert os.listdir(path.parent) == ["x_overlay.png"]


def test_overlay_keeps_single_pixels_when_downsampled():
    image = np.random.default_rng(0).random((400, 200)).astype(np.float32)
    pred = np.zeros((400, 200), bool)
    pred[123, 77] = True
    truth = np.zeros((400, 200), bool)
    truth[301, 150] = True
    rgb = overlay_rgb(image, pred, truth, max_side=50)
    assert rgb.shape == (50, 25, 3)
    red = np.all(rgb == (255, 0, 0), axis=-1)
    green = np.all(rgb == (0, 255, 0), axis=-1)
    assert red.any() and green.any()
    rows, cols = np.nonzero(red)
    assert abs(rows.mean() - 123 / 8) <= 1.5 and abs(cols.mean() - 77 / 8) <= 1.5


def test_write_csv_atomic_and_markdown(tmp_path):
    rows = [{"case": "a", "dice": 0.5, "n": 3}, {"case": "b|c", "dice": nan, "extra": True}]
    path = tmp_path / "t.csv"
    write_csv_atomic(rows, path)
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["case", "dice", "n", "extra"]
    assert got[0]["dice"] == "0.5" and got[1]["dice"] == "nan" and got[1]["n"] == "" and got[1]["extra"] == "True"
    md = markdown_table(rows, ["case", "dice"])
    assert md.splitlines() == ["| case | dice |", "|---|---|", "| a | 0.500 |", "| b\\|c | n/a |"]


def test_handler_and_activation_rate_in_monai_evaluator(tmp_path):
    """The real use: MONAI SupervisedEvaluator (decollate=True, postprocessing), batch size 2."""
    from monai.data import DataLoader, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.transforms import Lambdad

    data = []
    for c in _fake_cases():  # the image *is* the probability map, the network is the identity
        data.append({"image": MetaTensor(c["prob"], meta=c["image"].meta), "label": c["label"], "breast": c["breast"]})
    handler = MCMetricsHandler(csv_path=tmp_path / "m.csv", prefix="val_")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2, num_workers=0),
        network=torch.nn.Identity(),
        postprocessing=Lambdad(keys="pred", func=lambda x: x.clamp(0, 1)),
        key_val_metric={"val_act": ActivationRate()},
        val_handlers=[handler],
    )
    evaluator.run()
    for key, value in EXPECTED_SUMMARY.items():
        assert evaluator.state.metrics[f"val_{key}"] == approx(value), key
    assert evaluator.state.metrics["val_act"] == approx(3 / 112)
    assert [r["case"] for r in handler.rows] == ["caseA", "caseB"]
    assert handler.rows[0]["spacing_row_mm"] == 0.1


# ------------------------------------------------------------------------------------------
# scripts/score_outputs.py on a hand-made output folder
# ------------------------------------------------------------------------------------------
def test_score_outputs_prints_detection_metrics_per_case_and_pooled(tmp_path, capsys):
    from bundle.data import save_nifti_atomic
    from bundle.phantom import make_phantom, write_mg_dicom
    from scripts.score_outputs import main as score_main

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shape = (256, 208)
    ph = make_phantom(shape=shape, spacing=0.1, view="CC", laterality="L", seed=3, with_mcs=False, traps=False)
    cluster = [(100, 60), (100, 100), (100, 140)]  # 3 marks 4 mm apart at 0.1 mm
    for stem, truth_dots, pred_dots in (("normal", [], cluster + [(200, 60)]), ("pos", cluster, cluster)):
        write_mg_dicom(inp / f"{stem}.dcm", ph["image"].astype(np.uint16), spacing=0.1, laterality="L", view="CC")
        truth = np.zeros(shape, np.uint8)
        pred = np.zeros(shape, np.uint8)
        for r, c in truth_dots:
            truth[r:r + 2, c:c + 2] = 1
        for r, c in pred_dots:
            pred[r:r + 2, c:c + 2] = 1
        save_nifti_atomic(truth, inp / f"{stem}_label.nii.gz", spacing=(0.1, 0.1))
        (out / stem).mkdir(parents=True)
        save_nifti_atomic(pred, out / stem / f"{stem}_mask.nii.gz", spacing=(0.1, 0.1))
        save_nifti_atomic(pred.astype(np.float32) * 0.85, out / stem / f"{stem}_prob.nii.gz", spacing=(0.1, 0.1))
    code = score_main([str(inp), str(out), "--csv", str(tmp_path / "pc.csv"), "--curve-csv", str(tmp_path / "curve.csv")])
    text = capsys.readouterr().out
    assert code == 0, text
    lines = {ln.split(":")[0]: ln for ln in text.splitlines()}
    # every mark of the calcification-free image is false: 4 marks, the 3 in a row make a false cluster
    assert "false marks 4 (" in lines["normal"] and "FP clusters 1," in lines["normal"]
    assert "truth clusters detected 0/0" in lines["normal"] and "object IoU n/a" in lines["normal"]
    assert "false marks 0 (" in lines["pos"] and "FP clusters 0," in lines["pos"]
    assert "truth clusters detected 1/1" in lines["pos"] and "object IoU 1.000 (detected 1.000)" in lines["pos"]
    assert "false marks per image 2.00" in text and "FP clusters per image 0.50" in text
    assert "1 image without MCs: 4.00 false marks, 1.00 FP clusters per image" in text
    assert "cluster sensitivity 1/1 = 1.000" in text
    # sweep of the 0.85 maps: thresholds <= 0.8 give (0.5 FP clusters / image, 1.0), above (0, 0)
    assert "cluster FROC score 0.800" in text and "0.25: 0.000, 0.5: 1.000" in text
    with open(tmp_path / "pc.csv", newline="") as f:
        table = {r["case"]: r for r in csv.DictReader(f)}
    assert table["normal"]["n_fp_clusters"] == "1" and table["pos"]["n_detected_clusters"] == "1"
    assert float(table["normal"]["fp_marks_per_cm2"]) == approx(4 / float(table["normal"]["breast_area_cm2"]))
    with open(tmp_path / "curve.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert list(curve[0]) == list(CURVE_COLUMNS) and len(curve) == 14
    assert [float(r["fp_clusters"]) for r in curve] == [1.0] * 10 + [0.0] * 4  # 0.9 and above drop all
    # a mask without its probability map: per-case metrics, no sweep
    (out / "pos" / "pos_prob.nii.gz").unlink()
    assert score_main([str(inp), str(out)]) == 0
    assert "sweep skipped: no prob map for pos" in capsys.readouterr().out


def test_cluster_members_can_be_limited_by_size():
    """A truth cluster made only of 1-px specks counts only when every MC size is a member."""
    from bundle.metrics import cluster_stats, truth_clusters

    truth = np.zeros((100, 100), bool)
    for c in (10, 14, 18):  # three 1-px specks 0.4 mm apart at 0.1 mm
        truth[50, c] = True
    for c in (60, 66, 72):  # three 3x3 MCs (0.34 mm)
        truth[20:23, c : c + 3] = True
    _, ids, n = truth_clusters(truth, 0.1)
    assert n == 2
    _, ids, n = truth_clusters(truth, 0.1, member_min_diameter_mm=0.2)
    assert n == 1 and (ids >= 0).sum() == 3
    pred = np.zeros_like(truth)
    pred[20:23, 60:75] = False
    for c in (60, 66, 72):
        pred[21, c + 1] = True
    assert cluster_stats(pred, truth, 0.1)["cluster_sensitivity"] == 0.5
    assert cluster_stats(pred, truth, 0.1, member_min_diameter_mm=0.2)["cluster_sensitivity"] == 1.0
