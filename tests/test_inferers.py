"""Tile inferer: coverage, overlap averaging (seed Eqs. 4-5), background skipping, padding."""

import pytest
import torch

from bundle.inferers import BreastTileInferer, iter_tiles, tile_starts


class CountingNet(torch.nn.Module):
    """Returns its input unchanged and counts the tiles it saw."""

    def __init__(self):
        super().__init__()
        self.tiles = 0

    def forward(self, x):
        self.tiles += x.shape[0]
        return x


def test_tile_starts_cover_and_end_at_border():
    s = tile_starts(1000, 256, 0.25)
    assert s[0] == 0 and s[-1] == 1000 - 256
    assert all(b - a <= 192 for a, b in zip(s, s[1:]))
    assert tile_starts(100, 256, 0.5) == [0]
    with pytest.raises(ValueError):
        tile_starts(100, 10, 1.0)


def test_every_pixel_covered():
    cover = torch.zeros(300, 410)
    for rs, cs in iter_tiles((300, 410), (64, 96), 0.3):
        cover[rs, cs] += 1
    assert cover.min() >= 1


def test_identity_network_gives_input_back_after_averaging():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 200, 170)
    inf = BreastTileInferer(roi_size=64, overlap=0.5, sw_batch_size=3, sigmoid=False)
    y = inf(x, CountingNet())
    torch.testing.assert_close(y, x)


def test_averaging_of_disagreeing_tiles():
    # a network that outputs the tile's own column offset parity: overlaps must be averaged
    class ConstNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = 0

        def forward(self, x):
            out = []
            for _ in range(x.shape[0]):
                out.append(torch.full_like(x[0], float(self.k % 2)))
                self.k += 1
            return torch.stack(out)

    inf = BreastTileInferer(roi_size=(8, 8), overlap=0.5, sw_batch_size=1, sigmoid=False)
    y = inf(torch.zeros(1, 1, 8, 12), ConstNet())
    # tiles at columns 0, 4 -> values 0, 1; columns 4..7 are covered twice -> 0.5
    assert torch.allclose(y[0, 0, :, :4], torch.tensor(0.0))
    assert torch.allclose(y[0, 0, :, 4:8], torch.tensor(0.5))
    assert torch.allclose(y[0, 0, :, 8:], torch.tensor(1.0))


def test_background_tiles_are_skipped_and_zeroed():
    x = torch.ones(1, 1, 256, 256)
    breast = torch.zeros(1, 1, 256, 256)
    breast[..., :64, :64] = 1
    net = CountingNet()
    inf = BreastTileInferer(roi_size=64, overlap=0.0, sigmoid=False)
    y = inf(x, net, breast=breast)
    assert net.tiles == 1
    assert y[..., :64, :64].min() == 1 and y[..., 64:, :].max() == 0


def test_image_smaller_than_tile_is_padded_and_cropped_back():
    x = torch.rand(1, 1, 40, 50)
    y = BreastTileInferer(roi_size=64, sigmoid=True)(x, CountingNet())
    assert y.shape == x.shape
    torch.testing.assert_close(y, torch.sigmoid(x))


def test_no_breast_gives_zero_map():
    y = BreastTileInferer(roi_size=32)(torch.rand(1, 1, 64, 64), CountingNet(), breast=torch.zeros(1, 1, 64, 64))
    assert y.shape == (1, 1, 64, 64) and float(y.abs().sum()) == 0.0


def test_channels_last_and_bf16_options_keep_the_map():
    import torch

    from bundle.inferers import BreastTileInferer
    from bundle.networks import SegAINet

    torch.manual_seed(3)
    net = SegAINet(channels=[8, 16], strides=[2], num_res_units=1).eval()
    x = torch.rand(1, 1, 96, 80)
    with torch.no_grad():
        ref = BreastTileInferer(64, 0.25, 2)(x, net)
        cl = BreastTileInferer(64, 0.25, 2, channels_last=True)(x, net)
        bf = BreastTileInferer(64, 0.25, 2, autocast_dtype="bfloat16")(x, net)
    assert torch.allclose(cl, ref, atol=1e-5)
    assert float((bf - ref).abs().max()) < 0.05 and bf.dtype == torch.float32
    with pytest.raises(ValueError, match="autocast_dtype"):
        BreastTileInferer(64, 0.25, 2, autocast_dtype="int8")
