"""Per-image false-alarm control (bundle.falsealarm)."""

import numpy as np
import pytest

from bundle.falsealarm import FalseAlarmControl, candidate_scores, null_tail_threshold


def _null_scores(n: int, rng: np.random.Generator, scale: float = 0.8, loc: float = -3.0) -> np.ndarray:
    """Peak scores whose logits have an exponential tail (the model's null)."""
    g = loc + rng.exponential(scale, size=n)
    return 1.0 / (1.0 + np.exp(-g))


@pytest.mark.parametrize("expected", [2.0, 10.0, 30.0])
def test_null_tail_threshold_keeps_about_the_expected_number(expected):
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(40):
        s = _null_scores(3000, rng)
        t = null_tail_threshold(s, expected, fit_ranks=(30, 300), min_threshold=1e-6)
        counts.append(int((s >= t).sum()))
    # the mean count over many null images matches the stated operating point
    assert 0.6 * expected <= np.mean(counts) <= 1.6 * expected


def test_null_tail_threshold_adapts_to_the_image_not_a_fixed_value():
    rng = np.random.default_rng(1)
    quiet = _null_scores(3000, rng, loc=-4.0)
    busy = _null_scores(3000, rng, loc=0.0)  # another device: every score shifted up
    t_quiet = null_tail_threshold(quiet, 5.0, min_threshold=1e-6)
    t_busy = null_tail_threshold(busy, 5.0, min_threshold=1e-6)
    assert t_busy > t_quiet
    assert (quiet >= t_quiet).sum() <= 15 and (busy >= t_busy).sum() <= 15


def test_strong_outliers_survive_and_do_not_unseat_the_null():
    rng = np.random.default_rng(2)
    null = _null_scores(3000, rng)
    mcs = np.full(25, 0.9999)
    t = null_tail_threshold(np.concatenate([null, mcs]), 5.0, fit_ranks=(30, 300), min_threshold=0.01)
    assert t < 0.9999
    assert (null >= t).sum() <= 15


def test_few_candidates_fall_back_to_the_floor_and_limits_hold():
    assert null_tail_threshold([0.9, 0.7], 5.0, fit_ranks=(30, 300), min_threshold=0.6) == 0.6
    rng = np.random.default_rng(3)
    s = _null_scores(2000, rng, loc=5.0)
    assert null_tail_threshold(s, 1.0, max_threshold=0.97, min_threshold=0.5) == 0.97
    with pytest.raises(ValueError, match="expected_false_marks"):
        null_tail_threshold(s, 0.0)
    with pytest.raises(ValueError, match="fit_ranks"):
        null_tail_threshold(s, 1.0, fit_ranks=(300, 30))


def test_control_keeps_whole_strong_marks_and_few_weak_ones():
    rng = np.random.default_rng(4)
    h, w = 400, 400
    prob = np.zeros((h, w), np.float32)
    # 1500 weak 1-px candidates with an exponential logit tail, well apart on a grid
    ys, xs = np.meshgrid(np.arange(5, h - 5, 10), np.arange(5, w - 5, 10), indexing="ij")
    pos = np.stack([ys.ravel(), xs.ravel()], 1)[:1500]
    prob[pos[:, 0], pos[:, 1]] = _null_scores(len(pos), rng)
    # 4 strong marks of 3 x 3 px with a weaker rim (kept whole by hysteresis), between grid points
    for r, c in [(50, 50), (150, 250), (300, 100), (350, 350)]:
        prob[r - 1 : r + 2, c - 1 : c + 2] = 0.3
        prob[r, c] = 0.999
    ctl = FalseAlarmControl(expected_false_marks=5.0, candidate_threshold=0.02, fit_ranks=(30, 300), min_threshold=0.05)
    out = ctl(prob)
    m = out["mask"]
    for r, c in [(50, 50), (150, 250), (300, 100), (350, 350)]:
        assert m[r - 1 : r + 2, c - 1 : c + 2].all()
    assert 4 <= out["n_marks"] <= 4 + 15
    assert out["n_candidates"] > 1000
    breast = np.zeros((h, w), bool)
    breast[:200] = True
    inside = ctl(prob, breast)
    assert not inside["mask"][200:].any()


def test_candidate_scores_and_bad_input():
    p = np.zeros((20, 20), np.float32)
    p[2:4, 2:4] = [[0.2, 0.6], [0.3, 0.1]]
    p[10, 10] = 0.5
    labels, scores = candidate_scores(p, 0.15)
    assert sorted(np.round(scores, 3).tolist()) == [0.5, 0.6]
    assert labels.max() == 2
    with pytest.raises(ValueError, match="2-D"):
        candidate_scores(np.zeros((2, 3, 4)), 0.1)
    with pytest.raises(ValueError, match="candidate_threshold"):
        FalseAlarmControl(candidate_threshold=0.0)
    with pytest.raises(ValueError, match="min_threshold"):
        FalseAlarmControl(candidate_threshold=0.5, min_threshold=0.2)


def test_cluster_rescue_keeps_a_faint_cluster_not_faint_singles():
    rng = np.random.default_rng(7)
    h, w = 400, 400
    prob = np.zeros((h, w), np.float32)
    ys, xs = np.meshgrid(np.arange(5, h - 5, 10), np.arange(5, w - 5, 10), indexing="ij")
    pos = np.stack([ys.ravel(), xs.ravel()], 1)
    prob[pos[:, 0], pos[:, 1]] = _null_scores(len(pos), rng)
    # a faint cluster of 4 marks 0.3 mm apart (at 0.1 mm/px) and 2 faint isolated marks
    faint = 1.0 / (1.0 + np.exp(-(-3.0 + 4.5)))  # above the loose, below the strict threshold
    cluster = [(200, 202), (203, 202), (200, 206), (204, 207)]
    singles = [(52, 52), (352, 352)]
    for r, c in cluster + singles:
        prob[r, c] = faint
    base = dict(expected_false_marks=2.0, candidate_threshold=0.02, min_threshold=0.05, spacing_mm=0.1, cluster_link_mm=0.5)
    strict = FalseAlarmControl(**base)(prob)
    assert not any(strict["mask"][r, c] for r, c in cluster)
    rescued = FalseAlarmControl(**base, cluster_false_marks=40.0)(prob)
    assert all(rescued["mask"][r, c] for r, c in cluster)
    assert not any(rescued["mask"][r, c] for r, c in singles)
    assert rescued["cluster_threshold"] < rescued["threshold"]
    with pytest.raises(ValueError, match="cluster_false_marks"):
        FalseAlarmControl(expected_false_marks=5, cluster_false_marks=2)
