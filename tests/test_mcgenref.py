"""MC-GenRef: synthetic pairs, seeds, RF generator, TT-GPR and the bundle configs (tiny tensors)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from bundle.inferers import BreastTileInferer
from bundle.mcgenref import (
    InjectSyntheticMCd,
    MakeRFlowPaird,
    MCGenRefMethods,
    RFlowPrepareBatch,
    SeedRFGenerator,
    TTGPRInferer,
    TTGPRRefiner,
    edge_weights,
    euler_sample,
    extract_seeds,
    render_seed_map,
    seeds_from_label,
)
from bundle.networks import SegAINet
from bundle.phantom import inject_mcs, make_phantom

ROOT = Path(__file__).resolve().parents[1]


def normalised_negative(shape=(192, 160), seed=4):
    """A calcification-free phantom, normalised like NormalizeMammogramd (breast p1 -> 0, p99 -> 1)."""
    ph = make_phantom(shape=shape, seed=seed, with_mcs=False, traps=False)
    raw = ph["image"].astype(np.float32)
    breast = ph["breast"] > 0
    lo, hi = np.percentile(raw[breast], [1.0, 99.0])
    return raw, (raw - np.float32(lo)) / np.float32(hi - lo), breast, float(lo), float(hi)


def tiny_generator() -> SeedRFGenerator:
    torch.manual_seed(0)
    return SeedRFGenerator(channels=(8, 8), attention_levels=(False, False), norm_num_groups=4, num_head_channels=8)


def tiny_segmentor() -> torch.nn.Module:
    torch.manual_seed(1)
    return SegAINet(channels=(4, 8), strides=(2,), num_res_units=0).eval()


# ----------------------------------------------------------------------------------------------
# synthetic pairs
# ----------------------------------------------------------------------------------------------
def test_injection_gives_exact_label_and_changes_only_near_it():
    _, norm, breast, _, _ = normalised_negative()
    t = InjectSyntheticMCd(keys="image", background_key="background", n_clusters=(2, 2), margin_mm=0.5)
    t.set_random_state(seed=3)
    d = t({"image": torch.from_numpy(norm)[None], "breast": torch.from_numpy(breast.astype(np.uint8))[None]})
    img, bg = d["image"][0].numpy(), d["background"][0].numpy()
    label, seeds = d["label"][0].numpy() > 0.5, d["seed"][0].numpy() > 0.5
    assert np.array_equal(bg, norm)
    assert label.sum() > 0 and seeds.sum() > 0
    # the label is exactly inject_mcs's label for the same random stream
    ref_img, ref_label, clusters = inject_mcs(
        norm, breast, 0.07, np.random.default_rng(t._rng_seed), gain=1.0, **t.inject_kwargs
    )
    assert np.array_equal(label, ref_label > 0)
    np.testing.assert_allclose(img, ref_img, atol=1e-6)
    n_mcs = sum(len(c["mcs"]) for c in clusters)
    assert int(seeds.sum()) <= n_mcs and int(seeds.sum()) >= 1
    # the image changes only within a few pixels of the label (MC profile tail + PSF)
    changed = np.abs(img - bg) > 1e-6
    near = ndimage.binary_dilation(label, iterations=5)
    assert changed.any() and not (changed & ~near).any()
    # MCs are bright (dense) and all labelled pixels lie in the breast
    assert (img - bg)[label].min() > 0 and not (label & ~breast).any()
    # every seed lies on or next to a labelled pixel
    assert (seeds & ~ndimage.binary_dilation(label, iterations=1)).sum() == 0


def test_no_injection_gives_empty_label():
    _, norm, breast, _, _ = normalised_negative()
    t = InjectSyntheticMCd(keys="image", prob=0.0)
    d = t({"image": torch.from_numpy(norm)[None], "breast": torch.from_numpy(breast)[None]})
    assert float(d["label"].sum()) == 0 and float(d["seed"].sum()) == 0
    assert torch.equal(d["image"][0], torch.from_numpy(norm))


def test_injecting_after_normalisation_with_gain_one_equals_raw_injection():
    """Raw injection (gain estimated on the whole breast) == normalised injection with gain 1."""
    raw, norm, breast, lo, hi = normalised_negative()
    kw = dict(n_clusters=(2, 2), contrast=(0.1, 0.3), margin_mm=1.0)
    raw_out, raw_lab, _ = inject_mcs(raw, breast, 0.07, np.random.default_rng(5), **kw)
    n_out, n_lab, _ = inject_mcs(norm, breast, 0.07, np.random.default_rng(5), gain=1.0, **kw)
    assert np.array_equal(raw_lab, n_lab) and raw_lab.sum() > 0
    np.testing.assert_allclose((raw_out - lo) / (hi - lo), n_out, atol=2e-4)
    # on a patch, the gain estimated by inject_mcs would follow the patch's own spread instead
    r0, c0 = np.argwhere(ndimage.binary_erosion(breast, iterations=40))[0]
    patch = norm[r0 : r0 + 64, c0 : c0 + 64]
    spread = np.subtract(*np.percentile(patch, [99, 1]))
    assert abs(spread - 1.0) > 0.2


def test_make_rflow_pair_target_and_condition():
    _, norm, breast, _, _ = normalised_negative()
    inj = InjectSyntheticMCd(keys="image", background_key="background", n_clusters=(1, 1))
    inj.set_random_state(seed=8)
    d = inj({"image": torch.from_numpy(norm)[None], "breast": torch.from_numpy(breast)[None]})
    mk = MakeRFlowPaird(keys="image", n_spurious=(2, 2), alpha=(0.5, 0.5), residual_scale=4.0)
    mk.set_random_state(seed=9)
    e = mk(d)
    layer = (d["image"] - d["background"])[0]
    assert e["cond"].shape == (3, *norm.shape) and e["target"].shape == (1, *norm.shape)
    torch.testing.assert_close(e["target"][0], 4.0 * 0.5 * layer)
    # context channel = background + alpha * layer
    torch.testing.assert_close(e["cond"][1], d["background"][0] + 0.5 * layer)
    # the seed channel has the MC seeds plus two spurious seeds away from the MCs
    peaks = extract_seeds(e["cond"][0], threshold=0.99, radius=1)
    assert int(peaks.sum()) == int(d["seed"].sum()) + 2


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------
def test_extract_seeds_local_maxima_threshold_mask_and_plateau():
    yy, xx = np.mgrid[0:40, 0:50]
    prob = 0.9 * np.exp(-((yy - 10) ** 2 + (xx - 12) ** 2) / 8.0) + 0.4 * np.exp(-((yy - 30) ** 2 + (xx - 35) ** 2) / 8.0)
    prob[2:5, 40:43] = 0.7  # a plateau: one seed, not nine
    s = extract_seeds(torch.tensor(prob, dtype=torch.float32), threshold=0.3, radius=2)
    pts = {tuple(p) for p in torch.nonzero(s).tolist()}
    assert (10, 12) in pts and (30, 35) in pts
    assert sum(1 for p in pts if 2 <= p[0] < 5 and 40 <= p[1] < 43) == 1
    assert len(pts) == 3
    assert not extract_seeds(torch.tensor(prob, dtype=torch.float32), threshold=0.5)[30, 35]
    mask = np.ones_like(prob)
    mask[:20] = 0
    assert {tuple(p) for p in torch.nonzero(extract_seeds(prob, 0.3, 2, mask)).tolist()} == {(30, 35)}


def test_seeds_from_label_and_rendering():
    lab = np.zeros((20, 20), np.uint8)
    lab[3:6, 3:6] = 1
    lab[12, 14] = 1
    s = seeds_from_label(lab)
    assert {tuple(p) for p in torch.nonzero(s).tolist()} == {(4, 4), (12, 14)}
    m = render_seed_map(s, sigma=1.0)
    assert float(m[4, 4]) == pytest.approx(1.0) and float(m.max()) <= 1.0 and float(m[0, 19]) == 0.0


# ----------------------------------------------------------------------------------------------
# rectified flow
# ----------------------------------------------------------------------------------------------
def test_rflow_scheduler_convention_t_T_is_noise_and_target_is_x0_minus_noise():
    from monai.networks.schedulers import RFlowScheduler

    sch = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True, spatial_dim=2)
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(sch.add_noise(x0, noise, torch.tensor([1000, 1000])), noise)
    torch.testing.assert_close(sch.add_noise(x0, noise, torch.tensor([0, 0])), x0)
    torch.testing.assert_close(sch.add_noise(x0, noise, torch.tensor([250, 250])), 0.75 * x0 + 0.25 * noise)
    # with the exact velocity x0 - noise one Euler step from t = T lands on x0
    sch.set_timesteps(num_inference_steps=1)
    assert int(sch.timesteps[0]) == 1000
    x, _ = sch.step(x0 - noise, 1000, noise, 0)
    torch.testing.assert_close(x, x0)


def test_euler_step_and_sampling_shapes():
    gen = tiny_generator().eval()
    ctx = torch.rand(2, 1, 20, 28)
    pts = torch.zeros(2, 1, 20, 28)
    pts[0, 0, 10, 5] = 1
    cond = gen.condition(ctx, pts)
    assert cond.shape == (2, 3, 20, 28)
    cond16 = gen.condition(torch.rand(3, 1, 16, 16), torch.zeros(3, 1, 16, 16))
    x = euler_sample(gen, cond16, gen.scheduler(), n_steps=1, noise=torch.randn(3, 1, 16, 16))
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    out = gen.sample(ctx, pts, n_steps=2, n_samples=3, generator=torch.Generator().manual_seed(0), restrict_radius=2)
    assert out.shape == (2, 3, 1, 20, 28)
    diff = (out - ctx[:, None]).abs()
    assert float(diff[1].max()) == 0.0  # no seed: the projection is the observation
    far = torch.ones(20, 28, dtype=torch.bool)
    far[8:13, 3:8] = False
    assert float(diff[0, :, 0][:, far].max()) == 0.0  # layer only near the seed


def test_rflow_prepare_batch():
    pb = RFlowPrepareBatch(num_train_timesteps=1000, seed=3)
    batch = {"target": torch.randn(4, 1, 8, 8), "cond": torch.randn(4, 3, 8, 8)}
    inputs, target, args, kwargs = pb(batch, device="cpu")
    assert inputs.shape == (4, 4, 8, 8) and target.shape == (4, 1, 8, 8) and args == ()
    t = kwargs["timesteps"]
    assert t.shape == (4,) and int(t.min()) >= 0 and int(t.max()) < 1000
    noise = batch["target"] - target  # target = x0 - noise
    tp = (1.0 - t.float() / 1000.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs[:, :1], tp * batch["target"] + (1 - tp) * noise)
    torch.testing.assert_close(inputs[:, 1:], batch["cond"])


# ----------------------------------------------------------------------------------------------
# TT-GPR
# ----------------------------------------------------------------------------------------------
def _objectives(caplog) -> list[tuple[float, float]]:
    vals = []
    for rec in caplog.records:
        m = re.search(r"objective ([0-9.eE+-]+) -> ([0-9.eE+-]+)", rec.getMessage())
        if m:
            vals.append((float(m.group(1)), float(m.group(2))))
    return vals


def test_ttgpr_logs_a_decreasing_objective_and_returns_probabilities(caplog):
    _, norm, breast, _, _ = normalised_negative(shape=(64, 96), seed=6)
    x = torch.from_numpy(norm)[None, None]
    b = torch.from_numpy(breast.astype(np.float32))[None, None]
    inf = TTGPRInferer(
        generator=tiny_generator().eval(),
        init_inferer=BreastTileInferer(roi_size=32, overlap=0.25),
        tile_size=32, overlap=0.25, iterations=2, inner_steps=4, n_samples=2, euler_steps=2,
        seed_threshold=0.0, fire_threshold=0.0, step_size=0.1, w_edge=0.05, tv_eps=0.2,
    )
    with caplog.at_level(logging.INFO, logger="mcref.mcgenref"):
        out = inf(x, tiny_segmentor(), breast=b)
    assert out.shape == (1, 1, 64, 96)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out[b == 0].abs().max()) == 0.0
    objs = _objectives(caplog)
    assert len(objs) == 2 and all(after < before for before, after in objs)
    for it in (1, 2):  # gradient steps decrease the objective within each round
        vals = [h["objective"] for h in inf.history if h["iteration"] == it]
        assert all(b2 <= a2 + 1e-7 for a2, b2 in zip(vals, vals[1:]))
    assert inf.last_stats["tiles_active"] > 0


def test_ttgpr_overlap_term_makes_tiles_agree():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 48, 64)
    inf = TTGPRInferer(
        generator=None, init_inferer=BreastTileInferer(roi_size=32, overlap=0.5), tile_size=32, overlap=0.5,
        iterations=1, inner_steps=20, step_size=0.2, fire_threshold=0.0,
        w_data=0.0, w_edge=0.0, w_prox=0.0, w_overlap=1.0,
    )
    inf(x, tiny_segmentor())
    start, end = inf.last_stats["disagreement_start"], inf.last_stats["disagreement_end"]
    assert start > 1e-4 and end < 0.2 * start


class Scaled(torch.nn.Module):
    """Logits that follow the image: 6 * (x - 0.5)."""

    def forward(self, x):
        return 6.0 * (x - 0.5)


def _edge_run(edge_sigma: float, x: torch.Tensor) -> torch.Tensor:
    inf = TTGPRInferer(
        generator=None, init_inferer=BreastTileInferer(roi_size=32, overlap=0.25), tile_size=32, overlap=0.25,
        iterations=1, inner_steps=40, step_size=0.05, fire_threshold=0.0,
        w_data=0.0, w_overlap=0.0, w_prox=0.0, w_edge=1.0, edge_sigma=edge_sigma, tv_eps=0.5,
    )
    return inf(x, Scaled())[0, 0]


def test_edge_aware_smoothness_keeps_step_edges():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1, 32, 64)
    x[..., 32:] = 1.0
    x = x + 0.02 * torch.randn(x.shape, generator=g)
    p0 = torch.sigmoid(Scaled()(x))[0, 0]

    def jump(p):  # mean probability step across the image edge (columns 31 | 32)
        return float((p[:, 32] - p[:, 31]).mean())

    def flat(p):  # mean neighbour difference inside the flat left region
        return float((p[:, 1:28] - p[:, :27]).abs().mean())

    aware, plain = _edge_run(0.05, x), _edge_run(float("inf"), x)
    assert flat(aware) < 0.6 * flat(p0)  # noise is smoothed within the flat region
    assert jump(aware) > 0.95 * jump(p0)  # ... but not across the step edge
    assert jump(plain) < jump(aware) - 0.02  # plain TV erodes the edge more
    wx, _ = edge_weights(x, 0.05)
    assert float(wx[..., 31].max()) < 1e-6 and float(wx[..., :20].mean()) > 0.3


def test_ttgpr_without_active_tiles_returns_initial_map_and_adapters():
    x = torch.zeros(1, 1, 40, 40)

    class Low(torch.nn.Module):
        def forward(self, t):
            return torch.full_like(t, -8.0)

    inf = TTGPRInferer(generator=None, init_inferer=BreastTileInferer(roi_size=32), tile_size=32, seed_threshold=0.5)
    out = inf(x, Low())
    torch.testing.assert_close(out, torch.sigmoid(torch.tensor(-8.0)).expand(1, 1, 40, 40))
    assert inf.last_stats["tiles_active"] == 0
    ref = TTGPRRefiner(inf, Low(), use_given_prob=False)(np.zeros((40, 40), np.float32), None, None)
    assert ref["prob"].shape == (40, 40)
    methods = MCGenRefMethods(Low(), inf).refiners()
    img = np.zeros((40, 40), np.float32)
    assert set(methods) == {"mcgenref_init", "mcgenref_ttgpr"}
    np.testing.assert_allclose(methods["mcgenref_init"](img, None, None)["prob"], methods["mcgenref_ttgpr"](img, None, None)["prob"])


# ----------------------------------------------------------------------------------------------
# bundle configs
# ----------------------------------------------------------------------------------------------
def bundle_run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"bundle run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


TINY = ("--n_cases", "2", "--phantom_splits", "[2, 0, 0]", "--phantom_shape", "[256, 256]",
        "--max_epochs", "1", "--epoch_length", "2", "--num_samples", "2", "--patch_size", "[64, 64]")


@pytest.mark.slow
@pytest.mark.parametrize("config,name", [("train_mcgenref_seg.json", "mcgenref_seg.pt"), ("train_rflow.json", "rflow.pt")])
def test_two_iteration_training_through_the_bundle_config(tmp_path, config, name, monkeypatch):
    from monai.bundle import ConfigParser

    monkeypatch.chdir(ROOT)  # the train configs import blocks of configs/inference.json by relative path (``%``)

    ckpt = tmp_path / "models"
    bundle_run("--config_file", f"configs/{config}", "--dataset_dir", str(tmp_path / "data"), "--ckpt_dir", str(ckpt),
               "--output_dir", str(tmp_path / "out"), "--tracking_store", str(tmp_path / "mlruns"), *TINY)
    path = ckpt / name
    assert path.is_file()
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / config))
    net = parser.get_parsed_content("network_def")
    from bundle.engine import load_checkpoint

    load_checkpoint(net, path)  # the saved weights fit the config's network
    assert json.loads((tmp_path / "data" / "recipe.json").read_text())["with_mcs"] is False


@pytest.mark.slow
def test_inference_config_writes_initializer_and_ttgpr_maps(tmp_path):
    from bundle.phantom import make_dataset

    data = tmp_path / "in"
    make_dataset(data, n_cases=1, seed=4242, shape=(256, 224), splits=(0, 0, 1), progress=False)
    torch.manual_seed(0)
    seg = tmp_path / "seg.pt"
    torch.save(SegAINet().state_dict(), seg)
    parser_gen = json.loads((ROOT / "configs" / "inference_mcgenref.json").read_text())["generator_def"]
    kw = {k: v for k, v in parser_gen.items() if k != "_target_"}
    rf = tmp_path / "rf.pt"
    torch.save(SeedRFGenerator(**kw).state_dict(), rf)
    out = tmp_path / "out"
    bundle_run("--config_file", "['configs/inference.json','configs/inference_mcgenref.json']",
               "--dataset_dir", str(data), "--output_dir", str(out), "--ckpt_path", str(seg), "--rflow_ckpt_path", str(rf),
               "--ttgpr_params#iterations", "1", "--ttgpr_params#inner_steps", "2", "--ttgpr_params#n_samples", "1",
               "--ttgpr_params#euler_steps", "1", "--ttgpr_params#fire_threshold", "0.0", "--ttgpr_params#seed_threshold", "0.0")
    import nibabel as nib

    for key in ("prob", "mask", "refined_prob", "refined_mask"):
        arr = np.asarray(nib.load(str(out / "case_000" / f"case_000_{key}.nii.gz")).dataobj)
        assert arr.shape == (256, 224)
        assert arr.min() >= 0 and arr.max() <= 1


class _RecordingGenerator(torch.nn.Module):
    """Adds 1 at every seed and records the window sizes it is asked to sample."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[tuple[int, int]] = []

    def sample(self, context, seed_points, n_steps, n_samples, generator, restrict_radius):
        self.windows.append(tuple(context.shape[-2:]))
        out = context + seed_points.float()
        return out[:, None].repeat(1, n_samples, 1, 1, 1)


def test_rf_projection_of_a_dense_seed_field_is_sampled_in_bounded_windows():
    """One seed group spanning the image is split into cores of gen_max_box (plus context), and
    every seed still gets exactly its own projection (no seed painted twice or lost)."""
    gen = _RecordingGenerator()
    inf = TTGPRInferer(generator=gen, tile_size=32, n_samples=2, gen_margin=6, gen_max_box=40)
    x = torch.zeros(1, 1, 150, 170)
    seeds = torch.zeros_like(x)
    seeds[..., 5:145:9, 5:165:9] = 1.0  # a grid of seeds: their neighbourhoods touch, one group
    proj = inf._project_canvas(x, seeds, torch.Generator().manual_seed(0))
    assert len(gen.windows) > 1
    assert max(max(wh) for wh in gen.windows) <= 40 + 2 * 6
    torch.testing.assert_close(proj, seeds.expand(2, 1, 150, 170))
    gen.windows.clear()
    few = torch.zeros_like(x)
    few[..., 20, 30] = few[..., 24, 33] = 1.0  # a small group: one window, its bounding box
    torch.testing.assert_close(inf._project_canvas(x, few, torch.Generator().manual_seed(0)), few.expand(2, 1, 150, 170))
    assert len(gen.windows) == 1 and max(gen.windows[0]) <= 2 * 6 + 5
