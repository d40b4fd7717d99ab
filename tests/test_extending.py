"""A new refinement method is one class plus one config block (docs/extending.md).

A toy refiner is registered here, then run through the bundle's inference config (picked by
``refiner_name``) and through the study, with nothing else changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.refine import REFINERS, build_refiner, method_label, refiner_arguments, register_refiner

ROOT = Path(__file__).resolve().parents[1]


class SquaredSegAI:
    """Toy method: the refined map is SegAI's map squared (it sharpens the map's peaks).

    Args:
        power: exponent.
    """

    def __init__(self, power: float = 2.0) -> None:
        self.power = power

    def __call__(self, image, segai_prob, breast=None) -> dict:
        return {"prob": np.asarray(segai_prob, dtype=np.float32) ** self.power}


@pytest.fixture
def toy():
    register_refiner("segai+square", SquaredSegAI, label="SegAI squared", needs=("segai",),
                     defaults={"power": 2.0}, operating_point=0.25, description="test method")
    yield "segai+square"
    REFINERS.pop("segai+square", None)


def test_registration_describes_the_method(toy):
    ref = build_refiner(toy)
    assert (ref.name, ref.label, ref.needs, ref.operating_point) == (toy, "SegAI squared", ("segai",), 0.25)
    assert ref.power == 2.0 and build_refiner(toy, power=3.0).power == 3.0  # defaults, overridable
    assert method_label(toy) == "SegAI squared"
    with pytest.raises(KeyError, match="already exists"):
        register_refiner(toy, SquaredSegAI)
    with pytest.raises(ValueError, match="unknown needs"):
        register_refiner("bad", SquaredSegAI, needs=("segai", "gpu"))
    with pytest.raises(ValueError, match="needs the inpainter"):
        refiner_arguments("segai+genai", {}, None)
    with pytest.raises(KeyError, match="known:"):
        build_refiner("no-such-method")


def test_toy_refiner_runs_through_the_inference_config(toy, tmp_path):
    from monai.bundle import ConfigParser

    from bundle.phantom import make_dataset

    data = tmp_path / "data"
    make_dataset(data, n_cases=1, seed=4242, shape=(512, 416), splits=(0, 0, 1), progress=False)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(data), "output_dir": str(tmp_path / "out"),
                   "refiner_name": toy, "hole_control": None})
    runner = parser.get_parsed_content("runner")
    assert runner.pipeline.refiner.label == "SegAI squared"
    assert parser.get_parsed_content("refined_threshold") == pytest.approx(0.25)  # the method's own operating point
    assert parser.get_parsed_content("inpainter") is None  # not needed, not loaded
    rows = runner.run()
    assert [r["status"] for r in rows] == ["ok"]
    stem = rows[0]["case"]

    def read(suffix: str) -> np.ndarray:
        return np.squeeze(np.asarray(nib.load(str(tmp_path / "out" / stem / f"{stem}_{suffix}.nii.gz")).dataobj))

    prob, refined, rmask = read("prob"), read("refined_prob"), read("refined_mask")
    assert prob.max() > 0.5  # the phantom has MCs SegAI sees
    np.testing.assert_allclose(refined, prob.astype(np.float64) ** 2, atol=2e-3)
    assert np.array_equal(rmask > 0, refined >= 0.25) or abs(int((rmask > 0).sum()) - int((refined >= 0.25).sum())) <= 2
    assert 0 < int((rmask > 0).sum()) < int((prob >= 0.25).sum())


def test_toy_refiner_runs_through_the_study(toy, tmp_path):
    from bundle.study import MCStudy

    rng = np.random.default_rng(1)
    img = (0.4 + 0.05 * rng.standard_normal((64, 64))).astype(np.float32)
    lab = np.zeros((64, 64), np.uint8)
    for r, c in ((20, 20), (20, 26), (26, 20)):
        img[r: r + 2, c: c + 2] = 2.0
        lab[r: r + 2, c: c + 2] = 1
    (tmp_path / "dl.json").write_text(json.dumps({"test": [{"image": "a.png", "label": "a_label.png"}]}))

    def preprocessing(d: dict) -> dict:
        x = torch.as_tensor(img)[None]
        return {"image": x, "image_raw": x * 1000, "label": torch.as_tensor(lab)[None], "breast": torch.ones_like(x)}

    class Bright(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 40.0 * (x - 1.5)

    torch.save({}, tmp_path / "segai.pt")
    study = MCStudy(
        datalists=[str(tmp_path / "dl.json")], output_dir=tmp_path / "out", preprocessing=preprocessing,
        network=Bright(), ckpt_path=tmp_path / "segai.pt", inferer=lambda x, net, breast=None: torch.sigmoid(net(x)),
        methods=["segai", toy], settings={"cluster_link_mm": 1.0, "bootstrap_resamples": 20, "max_panels": 1},
        reference_method="segai", log_mlflow=False, command="test", progress=False,
    )
    res = study.run()
    assert res["methods"] == ["segai", toy] and not res["skipped"]
    assert study.settings.threshold_for(toy) == pytest.approx(0.25)
    assert res["metrics"][toy]["sensitivity"] == pytest.approx(1.0)
    assert "SegAI squared" in (tmp_path / "out" / "results.md").read_text()
