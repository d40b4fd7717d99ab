"""scripts/mine_hard_negatives.py: where SegAI fires on training tissue, away from every MC."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    from bundle.phantom import make_dataset

    d = tmp_path_factory.mktemp("hn")
    make_dataset(d, n_cases=2, seed=4242, shape=(512, 416), splits=(2, 0, 0), progress=False)
    cmd = [sys.executable, "scripts/mine_hard_negatives.py", "--datalist", str(d / "datalist.json"),
           "--threshold", "0.05", "--margin", "3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return d, p


def test_every_training_case_gets_its_hard_negatives_away_from_the_mcs(mined):
    from scipy import ndimage

    from bundle.data import BreastMaskd, LoadMammogramd, OrientBreastd, ResampleToSpacingd
    from bundle.training import MakeSamplingMapd
    from monai.transforms import Compose

    d, _ = mined
    spec = json.loads((d / "datalist_hardneg.json").read_text())
    original = json.loads((d / "datalist.json").read_text())
    assert len(spec["training"]) == len(original["training"]) == 2
    pre = Compose([LoadMammogramd(keys=["image", "label"]), OrientBreastd(keys=["image", "label"]),
                   ResampleToSpacingd(keys=["image", "label"], spacing=0.07, mode=["bilinear", "nearest"]),
                   BreastMaskd(image_key="image", out_key="breast")])
    total = 0
    for item in spec["training"]:
        assert (d / item["hardneg"]).is_file()
        data = pre({"image": str(d / item["image"]), "label": str(d / item["label"])})
        data["hardneg"] = str(d / item["hardneg"])
        m = MakeSamplingMapd(keys="label", dilation=0, hardneg_key="hardneg")(data)["sampling"][0]
        label = np.asarray(data["label"][0]) > 0.5
        hard = np.asarray(m) == 3
        total += int(hard.sum())
        assert not (hard & ndimage.binary_dilation(label, iterations=3)).any()
        assert not (hard & ~(np.asarray(data["breast"][0]) > 0.5)).any()
    assert total > 0  # at 0.05 the shipped SegAI fires somewhere on phantom tissue


def test_mining_refuses_a_missing_datalist(tmp_path):
    p = subprocess.run([sys.executable, "scripts/mine_hard_negatives.py", "--datalist", str(tmp_path / "nope.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "nope.json" in p.stderr


def test_second_round_keeps_the_first_and_writes_its_own_folder(mined):
    from bundle.training import load_hard_negatives

    d, _ = mined
    first = json.loads((d / "datalist_hardneg.json").read_text())
    before = {p.name: p.read_bytes() for p in (d / "hardneg").iterdir()}
    cmd = [sys.executable, "scripts/mine_hard_negatives.py", "--datalist", str(d / "datalist_hardneg.json"),
           "--threshold", "0.5", "--subdir", "hardneg2", "--keep-previous", "--out", str(d / "datalist_hardneg2.json")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert {q.name: q.read_bytes() for q in (d / "hardneg").iterdir()} == before  # round 1 untouched
    second = json.loads((d / "datalist_hardneg2.json").read_text())
    for a, b in zip(first["training"], second["training"]):
        assert b["hardneg"].startswith("hardneg2/")
        with np.load(d / a["hardneg"]) as z:
            shape = tuple(int(v) for v in z["shape"])
        r1, c1 = load_hard_negatives(d / a["hardneg"], shape)
        r2, c2 = load_hard_negatives(d / b["hardneg"], shape)
        old = set(zip(r1.tolist(), c1.tolist()))
        new = set(zip(r2.tolist(), c2.tolist()))
        assert old <= new  # a stricter threshold (0.5 > 0.05) still keeps every first-round pixel
