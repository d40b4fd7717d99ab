"""The per-image false-alarm control inside MammogramInference.predict (hole and final mask)."""

import numpy as np
import torch
from monai.data import MetaTensor

from bundle.engine import MammogramInference
from bundle.falsealarm import FalseAlarmControl


def _scene(seed: int = 0):
    """A SegAI-like map: many weak 1-px candidates with an exponential logit tail plus 3 strong marks."""
    rng = np.random.default_rng(seed)
    h, w = 300, 300
    prob = np.zeros((h, w), np.float32)
    ys, xs = np.meshgrid(np.arange(4, h - 4, 8), np.arange(4, w - 4, 8), indexing="ij")
    g = -3.0 + rng.exponential(0.8, size=ys.size)
    prob[ys.ravel(), xs.ravel()] = 1.0 / (1.0 + np.exp(-g))
    strong = [(50, 52), (150, 150), (250, 100)]
    for r, c in strong:
        prob[r, c] = 0.9999
    return prob, strong


def _runner(prob, seen, **kw):
    def preprocessing(d):
        img = MetaTensor(torch.zeros(1, *prob.shape), meta={"spacing": (0.07, 0.07)})
        return {"image": img, "breast": torch.ones(1, *prob.shape)}

    def inferer(x, net, breast=None):
        return torch.as_tensor(prob)[None, None]

    def refiner(image, seg, breast):
        seen["seg"] = seg.copy()
        return {"prob": seg}  # identity refiner: what reaches it comes out

    return MammogramInference(
        dataset_dir=None, output_dir="unused", preprocessing=preprocessing, inferer=inferer,
        network=torch.nn.Identity(), threshold=0.05, refiner=refiner, refined_threshold=0.01, progress=False, **kw,
    )


def test_without_control_the_fixed_threshold_marks_everything():
    prob, _ = _scene()
    seen = {}
    d = _runner(prob, seen).predict("x")
    n_marks = int((np.asarray(d["refined_mask"][0]) > 0).sum())
    assert n_marks > 1000  # the problem the control solves
    assert "refined_threshold_image" not in d["_row_extra"]


def test_final_control_keeps_strong_marks_and_about_the_expected_number():
    prob, strong = _scene()
    seen = {}
    ctl = FalseAlarmControl(expected_false_marks=5, candidate_threshold=0.02, min_threshold=0.05)
    d = _runner(prob, seen, false_alarm=ctl).predict("x")
    m = np.asarray(d["refined_mask"][0]) > 0
    assert all(m[r, c] for r, c in strong)
    assert 3 <= m.sum() <= 3 + 15
    assert 0.05 <= d["_row_extra"]["refined_threshold_image"] < 0.9999


def test_hole_control_limits_what_the_refiner_sees():
    prob, strong = _scene(1)
    seen = {}
    hole = FalseAlarmControl(expected_false_marks=10, candidate_threshold=0.02, min_threshold=0.05)
    d = _runner(prob, seen, hole_control=hole).predict("x")
    seg = seen["seg"]
    assert all(seg[r, c] > 0.99 for r, c in strong)
    assert 3 <= int((seg > 0).sum()) <= 3 + 25
    assert np.all(seg[seg > 0] == prob[seg > 0])  # SegAI's values, unchanged, inside kept marks
    assert "hole_threshold_image" in d["_row_extra"]
