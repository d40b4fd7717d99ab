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

from bundle.metrics import ActivationRate, MCMetricsHandler, aggregate, object_stats, pixel_stats
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
    "caseA": {"tp": 1, "fp": 1, "fn": 4, "dice": 2 / 7, "sensitivity": 1 / 5, "ppv": 1 / 2,
              "activation_rate": 2 / 56, "true_activation_rate": 5 / 56, "n_objects": 1, "n_detected": 0,
              "object_detection_rate": 0.0, "n_fp_objects": 1},
    "caseB": {"tp": 0, "fp": 1, "fn": 0, "dice": 0.0, "sensitivity": nan, "ppv": 0.0,
              "activation_rate": 1 / 56, "true_activation_rate": 0.0, "n_objects": 0, "n_detected": 0,
              "object_detection_rate": nan, "n_fp_objects": 1},
}
EXPECTED_SUMMARY = {
    "dice": 1 / 7, "sensitivity": 1 / 5, "ppv": 0.25, "activation_rate": 3 / 112,
    "true_activation_rate": 5 / 112, "object_detection_rate": 0.0, "object_detection_rate_pooled": 0.0,
    "image_detection_rate": 0.0, "fp_objects_per_image": 1.0,
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
