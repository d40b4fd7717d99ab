"""Tests of bundle.inpainting: network, training masks, loss, tiled inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.inpainting import (
    InpaintingLoss,
    MaskAwareInpainter,
    MaskAwareSwinBlock,
    RandInpaintMaskd,
    inpaint_crops,
    inpaint_tiles,
    plan_hole_crops,
    smooth_fill,
    random_inpaint_mask,
    tile_starts,
)


def _tiny_net(seed: int = 0) -> MaskAwareInpainter:
    torch.manual_seed(seed)
    return MaskAwareInpainter(embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4, patch_size=4).eval()


@pytest.fixture(scope="module")
def default_net() -> MaskAwareInpainter:
    torch.manual_seed(0)
    return MaskAwareInpainter().eval()


def test_default_parameter_count(default_net: MaskAwareInpainter) -> None:
    n = sum(p.numel() for p in default_net.parameters())
    assert n < 1_000_000


def test_shapes_batch_and_padding(default_net: MaskAwareInpainter) -> None:
    x = torch.rand(2, 1, 64, 64)
    hole = torch.zeros(2, 1, 64, 64)
    hole[:, :, 20:40, 10:30] = 1
    with torch.no_grad():
        assert default_net(x, hole).shape == (2, 1, 64, 64)
        assert default_net(torch.cat([x, hole], 1)).shape == (2, 1, 64, 64)  # hole as last channel
        y = default_net(torch.rand(1, 1, 50, 70), torch.ones(1, 1, 50, 70))  # not a multiple: padded
    assert y.shape == (1, 1, 50, 70)


def test_output_equals_input_outside_hole(default_net: MaskAwareInpainter) -> None:
    x = torch.rand(1, 1, 64, 64)
    hole = torch.zeros(1, 1, 64, 64)
    hole[..., 5:25, 30:60] = 1
    with torch.no_grad():
        y = default_net(x, hole)
    keep = hole == 0
    assert torch.equal(y[keep], x[keep])


def test_hole_pixels_are_never_seen(default_net: MaskAwareInpainter) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 64, 64, generator=gen)
    hole = torch.zeros(1, 1, 64, 64)
    hole[..., 16:48, 16:48] = 1
    x2 = x.clone()
    x2[hole > 0] = torch.rand(int(hole.sum()), generator=gen) * 10
    x2[0, 0, 20, 20] = float("nan")
    with torch.no_grad():
        y1, y2 = default_net(x, hole), default_net(x2, hole)
    assert torch.isfinite(y2).all()
    assert torch.equal(y1, y2)


def test_whole_tile_hole_no_nan(default_net: MaskAwareInpainter) -> None:
    with torch.no_grad():
        y = default_net(torch.rand(2, 1, 64, 64), torch.ones(2, 1, 64, 64))
    assert torch.isfinite(y).all()


def test_block_fully_invalid_window_is_finite() -> None:
    torch.manual_seed(0)
    blk = MaskAwareSwinBlock(8, 2, window_size=4, shift=2)
    x = torch.randn(1, 8, 8, 8)
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[0, :2, :2] = True  # only one window has valid tokens; after the shift, several have none
    y = blk(x, valid)
    assert torch.isfinite(y).all()
    assert torch.isfinite(blk(x, torch.zeros_like(valid))).all()


def test_block_ignores_invalid_tokens() -> None:
    torch.manual_seed(0)
    blk = MaskAwareSwinBlock(8, 2, window_size=4, shift=0).eval()
    x = torch.randn(1, 4, 4, 8)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 2:, :] = False
    x2 = x.clone()
    x2[0, 2:, :] += 5.0  # invalid keys change, valid queries must not
    y1, y2 = blk(x, valid), blk(x2, valid)
    assert torch.allclose(y1[0, :2], y2[0, :2], atol=1e-5)


def test_random_mask_ratio_and_determinism() -> None:
    for seed in range(6):
        m = random_inpaint_mask((128, 128), np.random.default_rng(seed), hole_ratio=(0.05, 0.4))
        assert m.dtype == np.uint8 and m.shape == (128, 128)
        assert 0.05 <= m.mean() <= 0.4
    a = random_inpaint_mask((96, 80), np.random.default_rng(7))
    b = random_inpaint_mask((96, 80), np.random.default_rng(7))
    assert np.array_equal(a, b)
    narrow = random_inpaint_mask((64, 64), np.random.default_rng(3), hole_ratio=(0.1, 0.12))
    assert 0.1 <= narrow.mean() <= 0.12


def test_rand_inpaint_maskd() -> None:
    t = RandInpaintMaskd(keys="image")
    t.set_random_state(5)
    d = t({"image": torch.rand(1, 64, 48)})
    assert d["hole"].shape == (1, 64, 48) and d["hole"].dtype == torch.float32
    assert 0.05 <= float(d["hole"].mean()) <= 0.4
    t.set_random_state(5)
    assert torch.equal(t({"image": torch.rand(1, 64, 48)})["hole"], d["hole"])
    dn = RandInpaintMaskd(keys="image")({"image": np.zeros((1, 32, 32), np.float32)})
    assert isinstance(dn["hole"], np.ndarray)


def test_loss_terms() -> None:
    loss = InpaintingLoss()
    t = torch.rand(1, 1, 16, 16)
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 4:8, 4:8] = 1
    assert float(loss(t, t, hole)) == 0.0
    p = t.clone()
    p[hole > 0] += 1.0  # constant error inside the hole: hole term 1 * 6, valid 0, grad on edges only
    val = float(loss(p, t, hole))
    assert val > 6.0
    assert torch.allclose(loss(p, torch.cat([t, hole], 1)), loss(p, t, hole))


@pytest.mark.parametrize("residual_fill, factor", [(False, 0.5), (True, 0.9)])
def test_loss_decreases_on_smooth_patches(residual_fill: bool, factor: float) -> None:
    """Training lowers the loss; the residual net starts from the smooth fill, so less is left."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    imgs, holes = [], []
    for _ in range(4):
        a, b, c = rng.uniform(-1, 1, 3)
        imgs.append(0.5 + 0.2 * (a * xx + b * yy) + 0.1 * np.sin(2 * np.pi * c * xx))
        holes.append(random_inpaint_mask((32, 32), rng, (0.1, 0.3)))
    x = torch.tensor(np.stack(imgs)[:, None], dtype=torch.float32)
    h = torch.tensor(np.stack(holes)[:, None], dtype=torch.float32)
    net = MaskAwareInpainter(
        embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4, patch_size=4, residual_fill=residual_fill
    ).train()
    loss_fn = InpaintingLoss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(net(x, h, composite=False), x, h)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < factor * np.mean(losses[:3])


def test_smooth_fill_keeps_known_pixels_and_interpolates() -> None:
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(48.0), indexing="ij")
    img = (0.3 + 0.01 * xx + 0.005 * yy)[None, None]
    hole = torch.zeros_like(img)
    hole[..., 10:14, 20:23] = 1.0
    out = smooth_fill(img, hole)
    assert torch.equal(out[hole == 0], img[hole == 0])
    assert float((out - img)[hole > 0].abs().max()) < 0.03  # a ramp is filled close to itself
    const = torch.full_like(img, 2.5)
    assert torch.allclose(smooth_fill(const, hole), const)
    everything = torch.ones_like(img)  # no known pixel: finite, 0
    assert torch.isfinite(smooth_fill(img, everything)).all()


def test_untrained_residual_inpainter_is_the_smooth_fill() -> None:
    torch.manual_seed(0)
    net = MaskAwareInpainter(embed_dim=16, depths=(1,), num_heads=(2,), window_size=4, patch_size=4).eval()
    assert net.residual_fill
    x = torch.rand(2, 1, 32, 32)
    h = torch.from_numpy(np.stack([random_inpaint_mask((32, 32), np.random.default_rng(i), (0.1, 0.3)) for i in range(2)]))
    h = h[:, None].float()
    with torch.no_grad():
        assert torch.allclose(net(x, h), smooth_fill(x, h), atol=1e-6)


class _CountingNet(torch.nn.Module):
    """Fills holes with a constant and records the tiles it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.tiles = 0
        self.tile_shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.tiles += x.shape[0]
        self.tile_shapes.append(tuple(x.shape))
        assert bool((hole.flatten(1).amax(1) > 0).all()), "a tile without hole pixels reached the network"
        return torch.where(hole > 0.5, torch.full_like(x, 0.25), x)


def test_tile_starts() -> None:
    assert tile_starts(100, 128, 0.25) == [0]
    assert tile_starts(128, 128, 0.25) == [0]
    s = tile_starts(300, 128, 0.25)
    assert s[0] == 0 and s[-1] == 300 - 128 and all(b - a <= 96 for a, b in zip(s[:-1], s[1:]))


def test_inpaint_tiles_only_hole_tiles_and_borders() -> None:
    img = torch.rand(300, 260)
    hole = torch.zeros(300, 260, dtype=torch.bool)
    hole[290:300, 250:260] = True  # bottom-right corner: only the inward-shifted border tile
    net = _CountingNet()
    out = inpaint_tiles(net, img, hole, tile=128, overlap=0.25, batch_size=8)
    assert net.tiles == 1 and net.tile_shapes[0] == (1, 1, 128, 128)
    assert torch.equal(out[~hole], img[~hole])
    assert torch.allclose(out[hole], torch.full((100,), 0.25))
    # a hole in the overlap of 4 tiles -> 4 tiles, averaged
    hole2 = torch.zeros(300, 260, dtype=torch.bool)
    hole2[100:110, 100:110] = True
    net2 = _CountingNet()
    out2 = inpaint_tiles(net2, img, hole2, tile=128, overlap=0.25, batch_size=3)
    assert net2.tiles == 4 and net2.calls == 2
    assert torch.allclose(out2[hole2], torch.full((100,), 0.25))
    assert torch.equal(out2[~hole2], img[~hole2])


def test_inpaint_tiles_empty_and_small_image() -> None:
    img = torch.rand(40, 50)
    net = _CountingNet()
    out = inpaint_tiles(net, img, torch.zeros(40, 50, dtype=torch.bool))
    assert net.calls == 0 and torch.equal(out, img)
    hole = torch.zeros(40, 50, dtype=torch.bool)
    hole[10:20, 10:30] = True
    out = inpaint_tiles(net, img, hole, tile=64)
    assert out.shape == (40, 50) and net.tile_shapes == [(1, 1, 64, 64)]
    assert torch.equal(out[~hole], img[~hole])


def test_inpaint_tiles_real_net_restores_train_mode() -> None:
    net = _tiny_net().train()
    img = torch.rand(70, 90)
    hole = torch.zeros(70, 90, dtype=torch.bool)
    hole[30:40, 40:60] = True
    out = inpaint_tiles(net, img, hole, tile=32, overlap=0.5)
    assert net.training
    assert torch.isfinite(out).all() and torch.equal(out[~hole], img[~hole])


def _interior_cover(crops: list[tuple[int, int, int]], shape: tuple[int, int], context: int) -> np.ndarray:
    h, w = shape
    cov = np.zeros(shape, dtype=bool)
    for r, c, s in crops:
        r0 = r if r == 0 else r + context
        r1 = r + s if r + s >= h else r + s - context
        c0 = c if c == 0 else c + context
        c1 = c + s if c + s >= w else c + s - context
        cov[r0:r1, c0:c1] = True
    return cov


def test_plan_hole_crops_covers_every_hole_pixel_with_context() -> None:
    rng = np.random.default_rng(3)
    hole = np.zeros((400, 300), dtype=bool)
    for _ in range(60):  # scattered small spots, some on the borders
        r, c = rng.integers(0, 400), rng.integers(0, 300)
        hole[r : r + rng.integers(1, 6), c : c + rng.integers(1, 6)] = True
    hole[100:300, 120:140] = True  # one long component: grid crops
    hole[395:400, 0:4] = True  # corner
    crops = plan_hole_crops(hole, crop_sizes=(32, 64), context=8, tile=128, overlap=0.25)
    assert all(0 <= r <= 400 - s and 0 <= c <= 300 - s for r, c, s in crops)
    assert {s for *_, s in crops} >= {32, 128}
    assert _interior_cover(crops, hole.shape, 8)[hole].all()
    # fewer pixels through the network than the 128-px tile grid of inpaint_tiles
    grid = [(r, c) for r in tile_starts(400, 128, 0.25) for c in tile_starts(300, 128, 0.25) if hole[r : r + 128, c : c + 128].any()]
    assert sum(s * s for *_, s in crops) < 0.5 * len(grid) * 128 * 128
    with pytest.raises(ValueError, match="context"):
        plan_hole_crops(hole, crop_sizes=(16,), context=8)
    with pytest.raises(ValueError, match="gaps"):
        plan_hole_crops(hole, crop_sizes=(64,), context=30, tile=128, overlap=0.25)


def test_inpaint_crops_fills_only_holes_and_matches_crop_sizes() -> None:
    img = torch.rand(300, 260)
    hole = torch.zeros(300, 260, dtype=torch.bool)
    hole[50:54, 60:63] = True  # small: one 32 crop
    hole[200:240, 100:130] = True  # 40 x 30: one 64 crop
    hole[296:300, 0:3] = True  # corner spot
    net = _CountingNet()
    out = inpaint_crops(net, img, hole, crop_sizes=(32, 64), context=8, batch_size=2)
    assert sorted(s[-1] for s in net.tile_shapes) == [32, 64] and net.tiles == 3
    assert torch.equal(out[~hole], img[~hole])
    assert torch.allclose(out[hole], torch.full((int(hole.sum()),), 0.25))
    # empty hole: no call; an image smaller than the grid tile is padded
    net2 = _CountingNet()
    assert torch.equal(inpaint_crops(net2, img, torch.zeros_like(hole)), img) and net2.calls == 0
    small = torch.rand(40, 50)
    sh = torch.zeros(40, 50, dtype=torch.bool)
    sh[0:40, 20:22] = True  # spans the whole height
    out3 = inpaint_crops(_CountingNet(), small, sh)
    assert out3.shape == (40, 50) and torch.equal(out3[~sh], small[~sh])


def test_inpaint_crops_real_net_close_to_tiles_on_small_holes() -> None:
    """On small holes, crops and the tile grid give similar fills with a real network."""
    torch.manual_seed(0)
    net = MaskAwareInpainter(embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=8, patch_size=4).train()
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    img = torch.sin(yy / 20) + torch.cos(xx / 25)
    hole = torch.zeros(256, 256, dtype=torch.bool)
    for r, c in ((40, 40), (100, 180), (200, 60), (250, 250)):
        hole[r : r + 4, c : c + 4] = True
    a = inpaint_crops(net, img, hole)
    b = inpaint_tiles(net, img, hole)
    assert net.training  # mode restored
    assert torch.isfinite(a).all() and torch.equal(a[~hole], img[~hole])
    err_a = (a - img)[hole].abs().mean()
    err_b = (b - img)[hole].abs().mean()
    # residual_fill starts at the smooth fill: both are accurate on a smooth image
    assert err_a < 0.05 and err_b < 0.05


def test_swin_block_small_grid_shortcut_equals_padded_window() -> None:
    """A token grid smaller than one window attends among its own tokens; the result equals
    the padded-window computation (taken when a sample has no valid token)."""
    torch.manual_seed(1)
    blk = MaskAwareSwinBlock(dim=16, num_heads=2, window_size=8, shift=4).eval()
    x = torch.randn(2, 5, 6, 16)
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[0, 1:3, 2:5] = False
    valid[1] = False  # forces the padded path for the whole batch
    with torch.no_grad():
        padded = blk(x, valid)[0]
        fast = blk(x[:1], valid[:1])[0]
    assert torch.allclose(fast, padded, atol=1e-5)
    assert torch.isfinite(padded).all()
