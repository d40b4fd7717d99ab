"""Study-level evaluation (``bundle/study.py``, ``configs/evaluate_study.json``, ``scripts/compare_runs.py``).

Hand-built cases for objects, densities, clusters and FROC; statistics sanity; the markdown writer;
a fast in-process study on synthetic arrays (failures, skipped methods); and ONE small end-to-end
``python -m monai.bundle run`` of the study on 2 tiny phantoms with random weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.study import (
    MCStudy,
    StudySettings,
    bootstrap_ci,
    bootstrap_indices,
    build_study_refiners,
    case_statistics,
    cluster_counts,
    find_clusters,
    format_ci,
    format_p,
    froc_curve,
    froc_summary,
    image_detection,
    invocation_command,
    object_max_prob,
    paired_wilcoxon,
    predicted_objects,
    replace_marked_section,
    resolve_density_threshold,
    single_linkage_groups,
    truth_objects,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# objects and densities
# ----------------------------------------------------------------------------------------------
def three_objects() -> tuple[np.ndarray, np.ndarray]:
    """3 objects: 2x2 (inside 500), 3x3 (inside 300), 1 px (inside 1000, ring 200); background 100."""
    t = np.zeros((40, 60), bool)
    raw = np.full((40, 60), 100.0)
    t[5:7, 5:7] = True
    raw[5:7, 5:7] = 500.0
    t[20:23, 20:23] = True
    raw[20:23, 20:23] = 300.0
    raw[29:32, 49:52] = 200.0  # the 1-px ring of the third object
    t[30, 50] = True
    raw[30, 50] = 1000.0
    return t, raw


def test_truth_objects_sizes_areas_and_densities():
    t, raw = three_objects()
    labels, objs = truth_objects(t, (0.1, 0.2), raw, ring_px=1)
    assert labels.shape == t.shape and labels.max() == 3
    assert [o["size_px"] for o in objs] == [4, 9, 1]
    assert np.allclose([o["area_mm2"] for o in objs], [4 * 0.02, 9 * 0.02, 0.02])
    assert [o["interior_density"] for o in objs] == [500.0, 300.0, 1000.0]
    assert [o["exterior_density"] for o in objs] == [100.0, 100.0, 200.0]
    assert (objs[1]["centroid_row"], objs[1]["centroid_col"]) == (21.0, 21.0)
    # a wider ring mixes in the background: (8 * 200 + 16 * 100) / 24
    _, objs2 = truth_objects(t, 0.1, raw, ring_px=2)
    assert objs2[2]["exterior_density"] == pytest.approx((8 * 200 + 16 * 100) / 24)
    # no raw image: NaN densities
    _, objs3 = truth_objects(t, 0.1)
    assert np.isnan(objs3[0]["interior_density"])


def test_object_max_prob_means_any_predicted_pixel_inside():
    t, _ = three_objects()
    labels, objs = truth_objects(t, 0.1)
    prob = np.zeros(t.shape, np.float32)
    prob[21, 22] = 0.7  # one pixel inside object 2
    prob[4, 5] = 0.99  # next to object 1, not inside
    mp = object_max_prob(labels, len(objs), prob)
    assert np.allclose(mp, [0.0, 0.7, 0.0])
    assert list(mp >= 0.5) == [False, True, False]
    assert object_max_prob(labels, 0, prob).size == 0


def test_predicted_objects_breast_and_min_size():
    pred = np.zeros((20, 20), bool)
    pred[2:4, 2:4] = True  # 4 px
    pred[10, 10] = True  # 1 px
    pred[15:18, 15] = True  # 3 px, outside the breast below
    breast = np.ones((20, 20), bool)
    breast[14:, :] = False
    labels, sizes, cents = predicted_objects(pred, 0.5, breast, min_size_px=2)
    assert list(sizes) == [4] and labels.max() == 1
    assert np.allclose(cents, [[1.25, 1.25]])  # centroid (2.5, 2.5) px * 0.5 mm


# ----------------------------------------------------------------------------------------------
# clusters
# ----------------------------------------------------------------------------------------------
def test_two_clusters_of_three_dots_5mm_apart():
    # dots 1 mm apart inside a cluster; the nearest dots of the two clusters are 5 mm apart
    a = np.array([[10.0, 10.0], [10.0, 11.0], [11.0, 10.0]])
    b = a + np.array([0.0, 6.0])  # (10, 16) is 5 mm from (10, 11)
    pts = np.concatenate([a, b])
    ids, n = find_clusters(pts, link_mm=4.0, min_count=3)
    assert n == 2 and list(ids) == [0, 0, 0, 1, 1, 1]
    ids, n = find_clusters(pts, link_mm=5.0, min_count=3)  # linking is inclusive
    assert n == 1 and set(ids) == {0}
    ids, n = find_clusters(pts, link_mm=4.0, min_count=4)
    assert n == 0 and set(ids) == {-1}
    assert find_clusters(np.zeros((0, 2)), 5.0)[1] == 0


def test_single_linkage_equals_brute_force():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(3)
    cases = [rng.uniform(0, 30, (300, 2)), np.array([[0, 0], [0, 1], [0, 2], [0, 3], [0, 10.0]]),
             np.array([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [1.0, 1.5], [9.0, 9.0]]), np.array([[2.0, 3.0]])]
    for pts in cases:
        for r in (0.8, 2.0):
            g = single_linkage_groups(pts, r)
            adj = squareform(pdist(pts)) <= r
            _, ref = connected_components(coo_matrix(adj), directed=False)
            # same partition: equal labels <=> equal reference labels
            assert np.array_equal(g[:, None] == g[None, :], ref[:, None] == ref[None, :])


def dots(mask: np.ndarray, centres: list[tuple[int, int]], value: float | None = None, prob: np.ndarray | None = None) -> None:
    for r, c in centres:
        mask[r : r + 2, c : c + 2] = True
        if prob is not None:
            prob[r : r + 2, c : c + 2] = value


def test_cluster_counts_detected_and_false_positive_clusters():
    # 0.1 mm pixels; clusters: >= 3 MCs, single linkage 1 mm (10 px)
    h, w = 200, 300
    truth = np.zeros((h, w), bool)
    A = [(20, 20), (20, 26), (26, 20)]
    B = [(20, 120), (20, 126), (26, 120)]
    dots(truth, A + B)
    truth[150, 150] = True  # an isolated truth MC (no cluster)
    labels, objs = truth_objects(truth, 0.1)
    cents = np.array([[o["centroid_row"] * 0.1, o["centroid_col"] * 0.1] for o in objs])
    tcid, n_tc = find_clusters(cents, 1.0, 3)
    assert n_tc == 2 and sorted(tcid.tolist()) == [-1, 0, 0, 0, 1, 1, 1]
    prob = np.zeros((h, w), np.float32)
    dots(np.zeros_like(truth), A, 0.95, prob)  # cluster A fully found
    dots(np.zeros_like(truth), B[:1], 0.95, prob)  # one MC of cluster B: no predicted cluster there
    dots(np.zeros_like(truth), [(100, 250), (100, 256), (106, 250)], 0.6, prob)  # FP cluster, weak
    dots(np.zeros_like(truth), [(180, 20)], 0.99, prob)  # an isolated FP MC: not a cluster
    prob[150, 150] = 0.95
    prob[150, 156] = prob[150, 160] = 0.95  # a cluster around the isolated truth MC: neither TP nor FP
    cc = cluster_counts(prob, [0.5, 0.9], labels, tcid, n_tc, 0.1, link_mm=1.0, min_count=3)
    assert cc["detected"].tolist() == [1, 1]
    assert cc["fp"].tolist() == [1, 0]
    assert cc["pred_clusters"].tolist() == [3, 2]
    assert cc["pred_objects"].tolist() == [11, 8]  # 3 + 1 + 3 + 1 + 3, the weak 3 go at 0.9
    # a stricter hit rule: all 3 MCs of A are hit -> still detected; 4 needed -> none
    assert cluster_counts(prob, [0.5], labels, tcid, n_tc, 0.1, link_mm=1.0, min_hit_mcs=3)["detected"].tolist() == [1]
    assert cluster_counts(prob, [0.5], labels, tcid, n_tc, 0.1, link_mm=1.0, min_hit_mcs=4)["detected"].tolist() == [0]


def test_case_statistics_row_and_false_alarm():
    s = StudySettings(cluster_link_mm=1.0, froc_thresholds=[0.3, 0.9])
    truth = np.zeros((60, 60), bool)
    dots(truth, [(10, 10), (10, 16), (16, 10)])
    prob = np.zeros((60, 60), np.float32)
    prob[10:12, 10:12] = 0.8  # one MC exactly
    prob[40, 40] = 0.8  # an FP object
    st = case_statistics(prob, truth, None, 0.1, s)
    row = st["row"]
    assert (row["tp"], row["fp"], row["fn"]) == (4, 1, 8)
    assert row["n_objects"] == 3 and row["n_detected"] == 1 and row["image_detected"] == 1.0
    assert row["n_pred_objects"] == 2 and row["n_fp_objects"] == 1 and np.isnan(row["false_alarm"])
    assert row["n_truth_clusters"] == 1 and row["n_detected_clusters"] == 0  # 1 predicted MC: no cluster
    assert list(st["froc"]["thresholds"]) == [0.3, 0.5, 0.9]  # the operating threshold is added
    normal = case_statistics(prob * 0, np.zeros_like(truth), None, 0.1, s)["row"]
    assert normal["false_alarm"] == 0.0 and np.isnan(normal["image_detected"])
    fa = case_statistics(prob, np.zeros_like(truth), None, 0.1, s)["row"]
    assert fa["false_alarm"] == 1.0
    # counting only objects of >= 5 px (or clusters) as alarms clears this image
    for relaxed in (StudySettings(false_alarm_min_px=5), StudySettings(false_alarm_unit="cluster")):
        assert case_statistics(prob, np.zeros_like(truth), None, 0.1, relaxed)["row"]["false_alarm"] == 0.0


def test_case_statistics_reader_metrics_and_sweep():
    """False marks, object IoU, breast area and the sweep in the form of bundle.metrics.detection_curve."""
    from bundle.metrics import curve_summary, pool_detection_curves

    s = StudySettings(cluster_link_mm=1.0, froc_thresholds=[0.3, 0.9])
    truth = np.zeros((60, 60), bool)
    dots(truth, [(10, 10), (10, 16), (16, 10)])  # 2x2 MCs at 0.1 mm: 0.226 mm, a truth cluster
    prob = np.zeros((60, 60), np.float32)
    prob[10:12, 10:12] = 0.8  # one MC exactly: IoU 1, the other two 0
    prob[40, 40] = 0.6  # a false mark up to threshold 0.6
    breast = np.zeros((60, 60), bool)
    breast[:50] = True  # 3000 px of 0.01 mm^2 = 0.3 cm^2
    st = case_statistics(prob, truth, breast, 0.1, s)
    row, curve = st["row"], st["curve"]
    assert row["n_objects_all"] == 3 and row["n_detected_all"] == 1
    assert row["object_iou"] == pytest.approx(1 / 3) and row["object_iou_detected"] == 1.0
    assert row["breast_area_cm2"] == pytest.approx(0.3) and row["fp_marks_per_cm2"] == pytest.approx(1 / 0.3)
    assert list(curve["thresholds"]) == [0.3, 0.5, 0.9]
    assert curve["n_objects"] == 3 and curve["n_truth_clusters"] == 1
    assert curve["detected_objects"].tolist() == [1, 1, 0] and curve["fp_marks"].tolist() == [1, 1, 0]
    assert st["froc"]["fp_objects"].tolist() == [1, 1, 0]
    # smaller MCs than tpr_min_diameter_mm leave the TPR
    assert case_statistics(prob, truth, breast, 0.1, StudySettings(tpr_min_diameter_mm=0.3))["curve"]["n_objects"] == 0
    # pooled with an image without MCs whose 3 false marks form a cluster
    normal_prob = np.zeros((60, 60), np.float32)
    for c in (10, 16, 22):
        normal_prob[30, c] = 0.95
    st_n = case_statistics(normal_prob, np.zeros_like(truth), None, 0.1, s)
    assert st_n["row"]["n_fp_objects"] == 3 and st_n["row"]["n_fp_clusters"] == 1
    assert np.isnan(st_n["row"]["object_iou"])
    pooled = pool_detection_curves([curve, st_n["curve"]])  # areas 0.3 + 0.36 cm^2
    assert np.allclose(pooled["fp_marks_per_cm2"], np.array([4, 4, 3]) / 0.66)
    assert np.allclose(pooled["object_tpr"], [1 / 3, 1 / 3, 0.0])
    assert np.allclose(pooled["fp_clusters_per_image"], [0.5, 0.5, 0.5])
    # TPR through (0, 0), (3/0.66, 0) [threshold 0.9] and (4/0.66, 1/3) [0.3 and 0.5]
    tpr = curve_summary(pooled, fp_per_cm2_rates=[1.0, 5.0, 7.0])
    assert tpr["tpr_at_1_fp_per_cm2"] == 0.0
    assert tpr["tpr_at_5_fp_per_cm2"] == pytest.approx((5.0 - 3 / 0.66) / (1 / 0.66) / 3)  # = 0.1
    assert tpr["tpr_at_7_fp_per_cm2"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# patient level, curves, FROC
# ----------------------------------------------------------------------------------------------
def test_image_detection_with_size_and_density_filters():
    # image 0: small dense-surround object missed, big object found; image 1: small object found;
    # image 2: no objects; image 3: one small object, missed
    obj_case = np.array([0, 0, 1, 3])
    size = np.array([10, 200, 30, 40])
    ext = np.array([2000.0, 1000.0, 1500.0, 1900.0])
    inn = np.array([1700.0, 2500.0, 1600.0, 1800.0])
    det = np.array([False, True, True, False])
    v_all = image_detection(obj_case, size <= 1000, det, 4)
    assert np.array_equal(v_all, [1.0, 1.0, np.nan, 0.0], equal_nan=True)
    v50 = image_detection(obj_case, size <= 50, det, 4)  # image 0 now only has its missed object
    assert np.array_equal(v50, [0.0, 1.0, np.nan, 0.0], equal_nan=True)
    thr = resolve_density_threshold({"raw": 1750.0, "percentile": 50}, ext)
    assert thr == 1750.0
    v_b = image_detection(obj_case, (size <= 50) & (ext >= thr), det, 4)
    assert np.array_equal(v_b, [0.0, np.nan, np.nan, 0.0], equal_nan=True)
    thr_c = resolve_density_threshold({"raw": None, "percentile": 50}, inn)
    assert thr_c == pytest.approx(1750.0)
    v_c = image_detection(obj_case, (size <= 50) & (inn <= thr_c), det, 4)
    assert np.array_equal(v_c, [0.0, 1.0, np.nan, np.nan], equal_nan=True)
    v_valid = image_detection(obj_case, size <= 1000, det, 4, valid=np.array([True, False, True, True]))
    assert np.isnan(v_valid[1])


def test_froc_curve_and_summary():
    # 2 images, 3 thresholds; 4 truth clusters in total
    detected = np.array([[2, 1, 0], [2, 2, 1]])
    fp = np.array([[3, 1, 0], [5, 0, 0]])
    fpi, sens = froc_curve(detected, fp, np.array([2, 2]))
    assert np.allclose(fpi, [4.0, 0.5, 0.0]) and np.allclose(sens, [1.0, 0.75, 0.25])
    summ = froc_summary(fpi, sens, [0.25, 0.5, 1, 2, 4])
    assert [summ[f"sens_at_{f:g}"] for f in (0.25, 0.5, 1, 2, 4)] == [0.25, 0.75, 0.75, 0.75, 1.0]
    assert summ["froc_score"] == pytest.approx(np.mean([0.25, 0.75, 0.75, 0.75, 1.0]))
    # no truth clusters: undefined
    fpi0, sens0 = froc_curve(detected * 0, fp, np.array([0, 0]))
    assert np.all(np.isnan(sens0)) and np.isnan(froc_summary(fpi0, sens0, [1])["froc_score"])


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def test_wilcoxon_identical_methods_and_nan_pairs():
    a = np.array([0.9, 0.8, np.nan, 0.7])
    r = paired_wilcoxon(a, a.copy())
    assert r["p_value"] == 1.0 and r["n_pairs"] == 3 and r["n_nonzero"] == 0
    assert np.isnan(paired_wilcoxon([np.nan], [1.0])["p_value"])
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, 20)
    shifted = paired_wilcoxon(x + 0.05 + rng.uniform(0, 0.01, 20), x)
    assert shifted["p_value"] < 0.001 and shifted["mean_difference"] > 0
    with pytest.raises(ValueError):
        paired_wilcoxon([1, 2], [1])


def test_bootstrap_ci_contains_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    v = rng.normal(0.8, 0.1, 40)
    lo, hi = bootstrap_ci(v, n_resamples=500, seed=7)
    assert lo < v.mean() < hi and hi - lo < 0.1
    assert (lo, hi) == bootstrap_ci(v, n_resamples=500, seed=7)
    lo2, hi2 = bootstrap_ci(np.append(v, [np.nan, np.nan]), n_resamples=500, seed=7)  # NaN images ignored
    assert lo2 < np.nanmean(v) < hi2
    idx = bootstrap_indices(5, 100, 0)
    assert idx.shape == (100, 5) and idx.max() < 5
    const = bootstrap_ci([1.0, 1.0, 1.0], n_resamples=50)
    assert const == (1.0, 1.0)
    pooled = bootstrap_ci(statistic=lambda ix: float(np.sum(v[ix]) / len(ix)), n=len(v), n_resamples=200)
    assert pooled[0] < v.mean() < pooled[1]
    assert np.isnan(bootstrap_ci([np.nan, np.nan])[0])


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------
def test_formatting_marked_section_and_command(tmp_path):
    assert format_ci(0.9531, 0.93, 0.97) == "95.3 [93.0, 97.0]"
    assert format_ci(float("nan"), 0, 1) == "n/a"
    assert format_ci(0.0043, 0.002, 0.006, digits=2) == "0.43 [0.20, 0.60]"
    assert (format_p(0.0001), format_p(0.0342), format_p(float("nan"))) == ("<0.001", "0.034", "n/a")
    doc = tmp_path / "results.md"
    replace_marked_section(doc, "study", "first")
    doc.write_text(doc.read_text() + "\nkept text\n")
    replace_marked_section(doc, "study", "second\n| a |\n")
    replace_marked_section(doc, "other", "third")
    text = doc.read_text()
    assert text.startswith("# Results") and "first" not in text and "kept text" in text
    assert text.count("mcref-study:begin study") == 1 and "second\n| a |" in text and "third" in text
    cmd = invocation_command(["/x/site-packages/monai/bundle/__main__.py", "run", "--config_file", "configs/evaluate_study.json",
                              "--methods", "['segai','segai+genai']"])
    assert cmd == "python -m monai.bundle run --config_file configs/evaluate_study.json --methods \"['segai','segai+genai']\""


def test_invocation_config_expands_the_config_imports(monkeypatch):
    """The study's ``summary/config.json`` (``invocation_config``) shows the imported blocks, not ``%`` macros."""
    from bundle.engine import invocation_config

    monkeypatch.chdir(ROOT)  # as the run, the imports resolve relative to the working directory
    cfg = invocation_config(["/x/site-packages/monai/bundle/__main__.py", "run", "--config_file",
                             "configs/evaluate_study.json", "--network_def#channels", "[8, 16]", "--n_cases", "3"])
    assert "%configs/" not in json.dumps(cfg, default=str)
    inference = json.loads((ROOT / "configs" / "inference.json").read_text())
    assert cfg["network_def"]["_target_"] == inference["network_def"]["_target_"]
    assert cfg["network_def"]["strides"] == inference["network_def"]["strides"]
    assert cfg["network_def"]["channels"] == [8, 16] and cfg["n_cases"] == 3  # overrides still applied
    assert cfg["working_spacing"] == inference["working_spacing"]
    assert cfg["_config_files"] == ["configs/evaluate_study.json"]


def test_methods_without_weights_are_skipped_with_reasons():
    refiners, skipped = build_study_refiners(
        ["segai", "sp1", "segai+genai", "grid_genai", "nonsense"], False, "models/model.pt: checkpoint not found",
        None, "models/inpainter.pt: checkpoint not found",
    )
    assert list(refiners) == ["sp1"]
    assert "SegAI" in skipped["segai"] and "model.pt" in skipped["segai+genai"]
    assert "inpainter.pt" in skipped["grid_genai"] and "unknown method" in skipped["nonsense"]
    refiners, skipped = build_study_refiners(["segai", "grid_genai"], True, "", None, "no file")
    assert list(refiners) == ["segai"] and list(skipped) == ["grid_genai"]


# ----------------------------------------------------------------------------------------------
# the study on synthetic arrays (fast, in-process)
# ----------------------------------------------------------------------------------------------
class BrightnessSegAI(torch.nn.Module):
    """A 1x1 convolution: logit = 40 * (x - 1.5), i.e. 'bright spots are MCs' (an oracle on these images)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def plain_inferer(x: torch.Tensor, net: torch.nn.Module, breast: torch.Tensor | None = None) -> torch.Tensor:
    return torch.sigmoid(net(x))


def synthetic_cases() -> dict[str, dict]:
    rng = np.random.default_rng(5)
    out = {}
    for name, centres, faint in (("pos_a", [(20, 20), (20, 26), (26, 20), (70, 70)], []),
                                 ("pos_b", [(30, 40), (30, 46), (36, 40)], [(60, 20)]),
                                 ("neg_c", [], [])):
        img = (0.4 + 0.05 * rng.standard_normal((96, 96))).astype(np.float32)
        lab = np.zeros((96, 96), np.uint8)
        for r, c in centres:
            img[r : r + 2, c : c + 2] = 2.0
            lab[r : r + 2, c : c + 2] = 1
        for r, c in faint:  # a faint MC SegAI misses
            img[r : r + 2, c : c + 2] = 1.0
            lab[r : r + 2, c : c + 2] = 1
        out[name] = {"image": img, "label": lab}
    return out


def test_study_in_process_failures_skips_and_tables(tmp_path):
    from bundle.data import MammogramError

    data = synthetic_cases()
    items = [{"image": f"{n}.png", "label": f"{n}_label.png"} for n in data] + [{"image": "broken.png", "label": None}]
    (tmp_path / "dl.json").write_text(json.dumps({"test": items}))

    def preprocessing(d: dict) -> dict:
        name = Path(d["image"]).name[:-4]
        if name not in data:
            raise MammogramError(d["image"], "unreadable test file")
        img = torch.as_tensor(data[name]["image"])[None]
        return {"image": img, "image_raw": img * 1000 + 500, "label": torch.as_tensor(data[name]["label"])[None],
                "breast": torch.ones_like(img)}

    net = BrightnessSegAI()
    with torch.no_grad():
        net.conv.weight.fill_(40.0)
        net.conv.bias.fill_(-60.0)
    torch.save(net.state_dict(), tmp_path / "segai.pt")
    study = MCStudy(
        datalists=[str(tmp_path / "dl.json"), ""], output_dir=tmp_path / "out", preprocessing=preprocessing,
        network=BrightnessSegAI(), ckpt_path=tmp_path / "segai.pt", inferer=plain_inferer,
        methods=["segai", "sp2", "segai+genai"], inpainter=None, inpainter_ckpt_path=tmp_path / "missing.pt",
        settings={"cluster_link_mm": 1.0, "bootstrap_resamples": 50, "max_panels": 1, "size_thresholds_px": [4, 10, None],
                  "table3_sizes_px": [4, None], "tpr_min_diameter_mm": 0.1},
        reference_method="segai", log_mlflow=False, command="python -m monai.bundle run --config_file x.json",
        results_doc=tmp_path / "docs" / "results.md", progress=False,
    )
    res = study.run()
    assert res["methods"] == ["segai", "sp2"] and "inpainter" in res["skipped"]["segai+genai"]
    assert [f["case"] for f in res["failed"]] == ["broken"] and "unreadable" in res["failed"][0]["error"]
    m = res["metrics"]["segai"]
    # the oracle finds the 7 bright MCs (28 px) and misses the faint one (4 px)
    assert m["sensitivity"] == pytest.approx(np.mean([1.0, 12 / 16]))
    assert m["ppv"] == pytest.approx(1.0) and m["image_specificity"] == 1.0
    assert m["image_detection_a_all"] == 1.0 and m["cluster_sensitivity"] == 1.0 and m["fp_clusters_per_image"] == 0.0
    assert m["froc_score"] == 1.0
    # reader metrics: no false mark anywhere; the 7 bright MCs are segmented exactly, the faint one missed
    assert m["fp_marks_per_image"] == 0.0 and m["fp_marks_per_normal_image"] == 0.0
    assert m["fp_clusters_per_normal_image"] == 0.0 and m["fp_marks_per_cm2"] == 0.0
    assert m["object_iou"] == pytest.approx(7 / 8) and m["object_iou_detected"] == pytest.approx(1.0)
    assert m["object_tpr"] == pytest.approx(7 / 8) and m["tpr_at_0.1_fp_per_cm2"] == pytest.approx(7 / 8)
    pts = [p for p in res["froc_points"] if p["method"] == "segai"]
    assert {"fp_marks_per_image", "fp_marks_per_cm2", "object_tpr"} <= set(pts[0])
    # Table 4 (MC-GenRef's columns): no false positive, so specificity is 1 on both MC images
    assert m["fnr"] == pytest.approx(np.mean([0.0, 4 / 16]))
    assert m["balanced_accuracy"] == pytest.approx(np.mean([1.0, (1 + 12 / 16) / 2]))
    assert m["g_mean"] == pytest.approx(np.mean([1.0, np.sqrt(12 / 16)]))
    t4 = {row["method"]: row for row in res["table4"]}
    assert t4["SegAI"]["g_mean"].startswith(f"{100 * m['g_mean']:.1f}")
    assert res["n_cases"] == 3 and res["n_with_mcs"] == 2 and res["n_objects"] == 8 and res["n_truth_clusters"] == 2
    raw_int = sorted(o["interior_density"] for o in res["objects"])
    assert raw_int[0] == pytest.approx(1500.0) and raw_int[-1] == pytest.approx(2500.0)
    md = (tmp_path / "out" / "results.md").read_text()
    for needle in ("Table 1", "Table 2", "Table 3", "Table 4", "G-Mean", "FROC", "python -m monai.bundle run --config_file x.json",
                   "### Detection metrics", "tpr_at_0.5_fp_per_cm2",
                   "`segai+genai`: needs inpainter weights", "| broken |", "specificity (images without MCs)"):
        assert needle in md, needle
    assert "Not available" in md  # Table 2 needs segai+genai and grid_genai
    assert "mcref-study:begin study" in (tmp_path / "docs" / "results.md").read_text()
    html = (tmp_path / "out" / "summary" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Table 3" in html and "Table 4" in html
    for f in ("per_case.csv", "objects.csv", "froc.csv"):
        assert (tmp_path / "out" / "segai" / f).is_file()
    assert len(list((tmp_path / "out" / "segai" / "panels").glob("*.png"))) == 1
    for f in ("fig6a.png", "fig6b.png", "fig6c.png", "froc.png", "metrics.csv", "pvalues.csv", "failed_cases.csv"):
        assert (tmp_path / "out" / "summary" / f).stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# ONE end-to-end run of the bundle entry point
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundle_study_end_to_end(tmp_path):
    import mlflow

    from bundle.inpainting import MaskAwareInpainter
    from bundle.networks import SegAINet

    torch.manual_seed(0)
    seg = SegAINet(channels=(8, 16), strides=(2,), num_res_units=0, norm="batch", act="relu")  # as configs/inference.json
    sd = seg.state_dict()
    last_bias = [k for k in sd if k.endswith("bias")][-1]
    sd[last_bias] = sd[last_bias] - 1.5  # random but sparse activations keep the refiners cheap
    torch.save(sd, tmp_path / "segai.pt")
    inp = MaskAwareInpainter(embed_dim=16, depths=(1,), num_heads=(2,), window_size=4, patch_size=4)
    torch.save(inp.state_dict(), tmp_path / "inpainter.pt")
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    methods = ["segai", "segai+classical", "segai+genai", "grid_genai"]
    args = {
        "output_dir": str(out), "ckpt_path": str(tmp_path / "segai.pt"), "inpainter_ckpt_path": str(tmp_path / "inpainter.pt"),
        "dataset_dir": str(tmp_path / "pos"), "normal_dataset_dir": str(tmp_path / "neg"), "n_cases": "1", "n_normal_cases": "1",
        "phantom_shape": "[256, 208]", "network_def#channels": "[8, 16]", "network_def#strides": "[2]",
        "network_def#num_res_units": "0", "inpainter_def#embed_dim": "16", "inpainter_def#depths": "[1]",
        "inpainter_def#num_heads": "[2]", "inpainter_def#window_size": "4", "inferer#roi_size": "128",
        "settings#bootstrap_resamples": "100", "settings#max_panels": "1", "tracking_uri": uri, "progress": "False",
        "methods": repr(methods), "results_doc": str(tmp_path / "docs_results.md"),
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate_study.json"]
    for k, v in args.items():
        cmd += [f"--{k}", v]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mcref_study")
    runs = client.search_runs([exp.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(methods + ["summary"])
    by_name = {r.info.run_name: r for r in runs}
    for m in methods:
        r = by_name[m]
        assert r.info.status == "FINISHED" and r.data.params["method"] == m
        for key in ("sensitivity", "activation_rate", "froc_score", "image_detection_a_le50", "sensitivity_ci_lo",
                    "fp_marks_per_image", "fp_marks_per_normal_image", "object_iou", "tpr_at_0.5_fp_per_cm2"):
            assert key in r.data.metrics
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"per_case.csv", "objects.csv", "froc.csv", "panels", "results.md"} <= arts
    assert "p_vs_ref_sensitivity" in by_name["segai"].data.metrics
    summ = {a.path for a in client.list_artifacts(by_name["summary"].info.run_id, "summary")}
    assert {"summary/report.html", "summary/fig6a.png", "summary/froc.png", "summary/config.json"} <= summ
    on_disk = (out / "summary" / "config.json").read_text()  # the configuration that ran, imports expanded
    assert "%configs/" not in on_disk and json.loads(on_disk)["network_def"]["channels"] == [8, 16]

    md = (out / "results.md").read_text()
    for needle in ("### Table 1", "### Table 2", "### Table 3", "### Cluster FROC", "### Detection metrics", "SegAI+R:GenAI",
                   "python -m monai.bundle run --config_file configs/evaluate_study.json"):
        assert needle in md, needle
    assert "Not available" not in md  # Table 2 has both rows
    assert "mcref-study:begin study" in (tmp_path / "docs_results.md").read_text()

    from scripts.compare_runs import main as compare_main

    assert compare_main([by_name["segai"].info.run_id, "segai+genai", "--tracking-uri", uri]) == 0
