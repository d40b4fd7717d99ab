"""SegAI network and training helpers."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bundle.networks import SegAINet, fold_batch_norms, prepare_for_inference
from bundle.training import MakeSamplingMapd, load_hard_negatives, prepare_png_negatives, save_hard_negatives


def test_segai_starts_at_the_prior_and_keeps_shape():
    torch.manual_seed(0)
    net = SegAINet(prior=0.01).eval()
    with torch.no_grad():
        y = net(torch.rand(2, 1, 64, 48))
    assert y.shape == (2, 1, 64, 48)
    # the background starts clearly negative: almost no pixel is positive before training
    assert float((y > 0).float().mean()) < 0.01
    assert abs(float(torch.sigmoid(y).mean()) - 0.01) < 0.02
    with pytest.raises(ValueError):
        SegAINet(prior=1.0)


def test_segai_learns_a_bright_dot_in_few_steps():
    torch.manual_seed(0)
    net = SegAINet(channels=(8, 16, 32), strides=(2, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x = torch.rand(8, 1, 32, 32) * 0.3
    y = torch.zeros_like(x)
    for i in range(8):
        r, c = 4 + 3 * i, 28 - 3 * i
        x[i, 0, r - 1 : r + 2, c - 1 : c + 2] += 0.6
        y[i, 0, r - 1 : r + 2, c - 1 : c + 2] = 1
    from monai.losses import DiceFocalLoss

    loss = DiceFocalLoss(sigmoid=True, batch=True, lambda_focal=10.0)
    for _ in range(25):
        out = net(x)
        l_ = loss(out, y)
        opt.zero_grad()
        l_.backward()
        opt.step()
    pred = net(x) > 0
    tp = (pred & (y > 0)).sum().item()
    assert tp / y.sum().item() > 0.8 and pred.sum().item() < 3 * y.sum().item()


def test_sampling_map_classes():
    label = torch.zeros(1, 20, 20)
    label[0, 10, 10] = 1
    breast = torch.zeros(1, 20, 20)
    breast[:, :, :15] = 1
    d = MakeSamplingMapd(keys="label", dilation=1)({"label": label, "breast": breast})
    m = d["sampling"]
    assert int(m[0, 10, 10]) == 2 and int(m[0, 9, 11]) == 2 and int(m[0, 10, 12]) == 1
    assert int(m[0, 0, 18]) == 0 and int(m[0, 0, 0]) == 1


def test_sampling_map_marks_mined_hard_negatives_outside_mcs(tmp_path):
    label = torch.zeros(1, 20, 20)
    label[0, 10, 10] = 1
    breast = torch.zeros(1, 20, 20)
    breast[:, :, :15] = 1
    hard = np.zeros((20, 20), bool)
    hard[3, 4] = hard[10, 11] = hard[5, 18] = True  # tissue, next to the MC, outside the breast
    save_hard_negatives(tmp_path / "hn.npz", hard)
    t = MakeSamplingMapd(keys="label", dilation=1, hardneg_key="hardneg")
    m = t({"label": label, "breast": breast, "hardneg": str(tmp_path / "hn.npz")})["sampling"]
    assert int(m[0, 3, 4]) == 3  # a hard negative in tissue
    assert int(m[0, 10, 11]) == 2  # the MC (dilated) wins over a hard negative
    assert int(m[0, 5, 18]) == 0  # never outside the breast
    assert int((m == 3).sum()) == 1
    # a case without mined hard negatives has none
    assert int((t({"label": label, "breast": breast})["sampling"] == 3).sum()) == 0
    # a file mined on another grid is refused, naming the file
    with pytest.raises(ValueError, match="hn.npz"):
        load_hard_negatives(tmp_path / "hn.npz", (21, 20))


def test_fold_batch_norms_keeps_the_output_and_removes_every_norm():
    torch.manual_seed(0)
    net = SegAINet(channels=(8, 16, 32), strides=(2, 2), norm="batch", act="relu")
    net.train()
    with torch.no_grad():
        for _ in range(3):  # give the running statistics values other than 0 / 1
            net(torch.rand(4, 1, 32, 32) * 3 + 1)
    net.eval()
    x = torch.rand(2, 1, 64, 48) * 3 + 1
    with torch.no_grad():
        before = net(x)
        fold_batch_norms(net)
        after = net(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert torch.allclose(before, after, atol=1e-4)
    # channels-last weights (the inference default without instance norm) give the same map
    prepare_for_inference(net)
    inner = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert inner.weight.is_contiguous(memory_format=torch.channels_last)
    assert not inner.weight.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(net(x), before, atol=1e-4)
    # an instance-norm network is left as it is
    inst = SegAINet(channels=(8, 16), strides=(2,)).eval()
    with torch.no_grad():
        y0 = inst(x)
        y1 = fold_batch_norms(inst)(x)
    assert torch.equal(y0, y1)


def test_png_negatives_follow_the_presentation_convention(tmp_path):
    """A right view stored with its chest wall on the left is mirrored in the DICOM."""
    import pydicom

    img = np.zeros((200, 160), np.uint8)
    yy, xx = np.mgrid[:200, :160]
    img[((yy - 100) / 90.0) ** 2 + (xx / 120.0) ** 2 < 1] = 150  # chest wall at column 0
    src = tmp_path / "png"
    src.mkdir()
    Image.fromarray(img).save(src / "R-CC.png")
    Image.fromarray(img).save(src / "L-CC.png")
    dl = prepare_png_negatives(src, tmp_path / "out", spacing=0.1)
    items = json.loads(open(dl).read())["training"]
    assert len(items) == 2
    r = pydicom.dcmread(tmp_path / "out" / "R-CC.dcm")
    left = pydicom.dcmread(tmp_path / "out" / "L-CC.dcm")
    assert r.ImageLaterality == "R" and float(r.PixelSpacing[0]) == pytest.approx(0.1)
    pr, pl = r.pixel_array.astype(float), left.pixel_array.astype(float)
    assert pr[:, -20:].mean() > pr[:, :20].mean()  # right breast: chest wall on the right
    assert pl[:, :20].mean() > pl[:, -20:].mean()
    assert math.isclose(pr.max(), 150 * 16383 / 255, rel_tol=0.01)


def test_png_negatives_hold_out_named_views(tmp_path):
    """Views named in test_names go to the test list, never to training; unknown names fail."""
    img = np.zeros((120, 100), np.uint8)
    img[20:100, :70] = 140
    src = tmp_path / "png"
    src.mkdir()
    for n in ("L-CC", "R-MLO"):
        Image.fromarray(img).save(src / f"{n}.png")
    dl = json.loads(open(prepare_png_negatives(src, tmp_path / "out", test_names=["r-mlo"])).read())
    assert [d["image"] for d in dl["training"]] == ["L-CC.dcm"]
    assert [d["image"] for d in dl["test"]] == ["R-MLO.dcm"]
    with pytest.raises(ValueError, match="R-CC"):
        prepare_png_negatives(src, tmp_path / "out2", test_names=["R-CC"])
