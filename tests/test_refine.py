"""Tests of bundle.refine: SP maps, SegAI+R:SP, generative refinement and baselines."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bundle.refine import (
    REFINERS,
    build_refiner,
    classical_inpaint_fn,
    difference_scale,
    genai_refine,
    grid_mask_refine,
    network_inpaint_fn,
    register_refiner,
    sp1_gaussian_blur_difference,
    sp2_white_tophat,
    sp_refine_with_segai,
)


def _scene(seed: int = 0, size: int = 96) -> dict[str, np.ndarray]:
    """Smooth background + weak noise, one true bright dot (MC) and a false-positive SegAI blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    background = (0.4 + 0.2 * xx + 0.1 * np.sin(3 * yy) + 0.005 * rng.standard_normal((size, size))).astype(np.float32)
    image = background.copy()
    dot = (np.mgrid[0:size, 0:size][0] - 30) ** 2 + (np.mgrid[0:size, 0:size][1] - 30) ** 2 <= 4
    image[dot] += 0.4
    segai = np.zeros((size, size), np.float32)
    segai[dot] = 0.9
    fp = np.zeros((size, size), bool)
    fp[60:64, 60:64] = True  # SegAI fires where the image is plain background
    segai[fp] = 0.8
    return {"image": image, "background": background, "segai": segai, "dot": dot, "fp": fp}


def _oracle(background: np.ndarray):
    def fn(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        return np.where(hole, background, image)

    return fn


def test_sp_maps_respond_to_dot() -> None:
    s = _scene()
    for fn in (sp1_gaussian_blur_difference, sp2_white_tophat):
        m = fn(s["image"])
        assert m.dtype == np.float32 and m.shape == s["image"].shape
        assert 0.0 <= m.min() and m.max() <= 1.0
        assert m[s["dot"]].mean() > 0.9
        assert m[s["fp"]].mean() < 0.3
    # breast mask and torch input
    breast = np.zeros_like(s["dot"])
    breast[:, :80] = True
    m = sp2_white_tophat(torch.from_numpy(s["image"]), breast=torch.from_numpy(breast))
    assert np.all(m[:, 80:] == 0) and m[s["dot"]].mean() > 0.9


def test_sp_refine_with_segai_zero_where_pooled_zero() -> None:
    s = _scene()
    sp = sp1_gaussian_blur_difference(s["image"])
    r = sp_refine_with_segai(sp, s["segai"], pool_size=9)
    assert r.max() == pytest.approx(1.0)
    from scipy import ndimage as ndi

    support = ndi.maximum_filter(s["segai"] > 0, 9, mode="constant")
    assert np.all(r[~support] == 0)
    assert r[s["dot"]].mean() > 0.5
    rs = sp_refine_with_segai(sp, s["segai"], pool_size=8, stride=8)
    assert rs.shape == sp.shape and rs[~ndi.maximum_filter(s["segai"] > 0, 24)].max() == 0
    assert np.all(sp_refine_with_segai(sp, np.zeros_like(sp)) == 0)


def test_genai_refine_oracle_keeps_true_dot_and_drops_fp() -> None:
    s = _scene()
    out = genai_refine(s["image"], s["segai"], _oracle(s["background"]))
    prob, virtual, hole = out["prob"], out["virtual_normal"], out["hole"]
    assert prob.dtype == np.float32 and prob.shape == s["image"].shape
    assert prob[s["dot"]].mean() > 0.9
    assert prob[s["fp"]].max() < 0.05
    assert np.all(prob[~hole] == 0)
    assert np.array_equal(virtual[~hole], s["image"][~hole])
    assert hole[s["fp"]].all() and hole.sum() > (s["segai"] >= 0.5).sum()  # dilated
    # torch inputs and a fixed scale
    img_t, seg_t = torch.from_numpy(s["image"]), torch.from_numpy(s["segai"])
    out_t = genai_refine(img_t, seg_t, _oracle(s["background"]), scale=0.2)
    assert out_t["prob"][s["dot"]].min() == pytest.approx(1.0)


def test_genai_refine_signed_vs_abs() -> None:
    s = _scene()
    dark_bg = s["background"] + 0.3  # oracle says the tissue is brighter than the image
    out_s = genai_refine(s["image"], s["segai"], _oracle(dark_bg), scale=0.1)
    out_a = genai_refine(s["image"], s["segai"], _oracle(dark_bg), scale=0.1, signed=False)
    assert out_s["prob"][s["fp"]].max() == 0.0
    assert out_a["prob"][s["fp"]].min() > 0.9


def test_genai_refine_no_activation_and_nan() -> None:
    s = _scene()
    with pytest.warns(UserWarning, match="no activation"):
        out = genai_refine(s["image"], np.zeros_like(s["segai"]), _oracle(s["background"]))
    assert np.all(out["prob"] == 0) and np.array_equal(out["virtual_normal"], s["image"])
    img = s["image"].copy()
    img[61, 61] = np.nan
    img[5:8, 5:8] = np.nan
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = genai_refine(img, s["segai"], _oracle(s["background"]))
    assert any("non-finite" in str(w.message) for w in rec)
    assert np.isfinite(out["prob"]).all() and np.isfinite(out["virtual_normal"]).all()
    assert not out["hole"][61, 61] and out["prob"][61, 61] == 0
    assert out["prob"][s["dot"]].mean() > 0.9


def test_classical_inpaint_fn() -> None:
    s = _scene()
    hole = np.zeros_like(s["dot"])
    hole[40:46, 10:16] = True
    hole[80:84, 80:90] = True
    v = classical_inpaint_fn()(s["image"], hole)
    assert np.array_equal(v[~hole], s["image"][~hole])
    assert np.abs(v[hole] - s["background"][hole]).max() < 0.05
    out = genai_refine(s["image"], s["segai"], classical_inpaint_fn())
    assert out["prob"][s["dot"]].mean() > 0.9 and out["prob"][s["fp"]].mean() < 0.3


def test_grid_mask_refine_covers_every_pixel() -> None:
    s = _scene(size=70)
    seen = np.zeros((70, 70), np.int32)
    calls = []

    def fn(crop: np.ndarray, hole: np.ndarray) -> np.ndarray:
        calls.append(crop.shape)
        return np.where(hole, crop - 0.01, crop)

    out = grid_mask_refine(s["image"], fn, grid=32, context=8)
    seen += out["coverage"]
    assert np.all(seen == 1) and len(calls) == 9
    assert np.allclose(out["virtual_normal"], s["image"] - 0.01, atol=1e-6)
    assert out["prob"].shape == (70, 70) and out["prob"].min() > 0
    breast = np.zeros((70, 70), bool)
    breast[:, :20] = True
    out_b = grid_mask_refine(s["image"], fn, grid=32, breast=breast)
    assert np.all(out_b["coverage"][:, 64:] == 0) and np.all(out_b["prob"][:, 20:] == 0)


def test_difference_scale_floor_and_noise() -> None:
    flat = np.full((32, 32), 0.3, np.float32)
    assert difference_scale(flat) > 0
    noisy = np.random.default_rng(0).normal(0.5, 0.02, (64, 64)).astype(np.float32)
    assert 0.05 < difference_scale(noisy, k_sigma=6.0) < 0.2


class _Fill(torch.nn.Module):
    def forward(self, x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        return torch.where(hole > 0.5, torch.zeros_like(x), x)


def test_registry_and_network_refiner() -> None:
    assert set(REFINERS) >= {
        "segai", "sp1", "sp2", "segai+sp1", "segai+sp2", "segai+genai", "segai+classical", "grid_genai"
    }
    s = _scene(size=64)
    breast = np.ones((64, 64), bool)
    net = _Fill()
    for name in REFINERS:
        kw = {"net": net, "tile": 32} if name in ("segai+genai", "grid_genai") else {}
        if name == "grid_genai":
            kw["grid"] = 16
        res = build_refiner(name, **kw)(s["image"], s["segai"], breast)
        p = res["prob"]
        assert p.shape == (64, 64) and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1, name
    v = network_inpaint_fn(net, tile=32)(s["image"], s["dot"])
    assert np.all(v[s["dot"]] == 0) and np.array_equal(v[~s["dot"]], s["image"][~s["dot"]])
    with pytest.raises(KeyError):
        build_refiner("nope")
    with pytest.raises(KeyError):
        register_refiner("segai", REFINERS["segai"])


def test_sp_refiner_segai_threshold_drops_weak_segai_support() -> None:
    """With segai_threshold, SegAI values below it give no support to the SP map."""
    from bundle.refine import SPRefiner

    img = np.zeros((40, 40), np.float32)
    img[10, 10] = img[30, 30] = 1.0
    seg = np.zeros_like(img)
    seg[10, 10], seg[30, 30] = 0.9, 0.05  # a confident and a weak SegAI response
    raw = SPRefiner("sp2", use_segai=True)(img, seg)["prob"]
    cut = SPRefiner("sp2", use_segai=True, segai_threshold=0.1)(img, seg)["prob"]
    assert raw[30, 30] > 0 and raw[10, 10] > 0
    assert cut[30, 30] == 0 and cut[10, 10] > 0


@pytest.mark.parametrize("mode", ["tiles", "crops"])
def test_genai_refiner_network_modes_on_bad_input(mode: str) -> None:
    """Both inpainting modes give a valid map for a hole covering a whole tile, holes on the
    image border, NaN pixels and no activation at all; an unknown mode is refused."""
    from bundle.inpainting import MaskAwareInpainter

    torch.manual_seed(0)
    net = MaskAwareInpainter(embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=8, patch_size=4).eval()
    s = _scene(size=160)
    img = s["image"].copy()
    seg = s["segai"].copy()
    seg[0:40, 0:40] = 0.9  # a whole 32 px tile and more, on the corner
    seg[155:160, 80:90] = 0.9  # bottom border
    img[100, 100] = np.nan
    ref = build_refiner("segai+genai", net=net, mode=mode, tile=64, crop_sizes=(24, 32), context=6, threshold=0.5, dilation_px=1)
    with pytest.warns(UserWarning, match="non-finite"):
        out = ref(img, seg, None)
    p, v = out["prob"], out["virtual_normal"]
    assert p.shape == img.shape and p.dtype == np.float32 and np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1
    assert np.isfinite(v).all() and p[100, 100] == 0
    assert np.array_equal(v[~out["hole"]], np.nan_to_num(img, nan=v[100, 100])[~out["hole"]])
    assert p[s["dot"]].mean() > 0.5  # the bright dot stands out of the virtual normal tissue
    with pytest.warns(UserWarning, match="no activation"):
        empty = ref(s["image"], np.zeros_like(seg), None)
    assert not empty["prob"].any()
    with pytest.raises(ValueError, match="mode"):
        network_inpaint_fn(net, mode="bogus")


def test_hole_dilation_equals_binary_dilation() -> None:
    """The shifted-OR dilation gives the same hole as scipy, also for radii beyond the image."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    from bundle.refine_maps import _dilate_disk

    rng = np.random.default_rng(0)
    for shape, r in (((3, 4), 5), ((40, 30), 2), ((25, 25), 1), ((25, 25), 3)):
        m = rng.random(shape) > 0.9
        m[0, 0] = m[-1, -1] = True  # borders
        assert np.array_equal(_dilate_disk(m, r), ndi.binary_dilation(m, structure=disk(r).astype(bool)))
