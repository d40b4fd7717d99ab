"""The one two-stage pipeline: the runner, MONAI's workflow properties and an ignite evaluator all
run the same maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.pipeline import MCPipeline, PipelineInferer

ROOT = Path(__file__).resolve().parents[1]


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * (x - 1.0)


def plain(x, net, breast=None):
    p = torch.sigmoid(net(x))
    return p if breast is None else p * (breast > 0)


def test_pipeline_names_its_maps_and_applies_operating_points():
    img = np.full((32, 32), 0.5, np.float32)
    img[10:12, 10:12] = 2.0  # a bright speck
    img[20, 20] = 1.02  # a faint one: prob just above 0.5
    breast = np.ones_like(img, bool)
    breast[:, 28:] = False

    def refiner(image, prob, b):
        return {"prob": np.where(image > 1.5, prob, 0.0), "virtual_normal": np.minimum(image, 0.5), "hole": prob > 0.1}

    pipe = MCPipeline(Doubler(), plain, refiner, threshold=0.5, refined_threshold=0.9)
    maps = pipe(img, breast)
    assert {"prob", "mask", "refined_prob", "refined_mask", "virtual_normal", "hole", "extras"} <= set(maps)
    assert maps["mask"][20, 20] and maps["mask"][10, 10] and not maps["mask"][0, 0]
    assert maps["refined_mask"][10, 10] and not maps["refined_mask"][20, 20]
    assert maps["refined_prob"].dtype == np.float32 and maps["virtual_normal"].max() == pytest.approx(0.5)
    assert float(maps["prob"][:, 28:].max()) == 0.0  # the breast mask reached SegAI's inferer
    # a per-image hole control limits what the refiner sees and reports its threshold
    seen = {}

    def control(prob, b):
        return {"mask": prob > 0.99, "threshold": 0.99}

    def spy(image, prob, b):
        seen["prob"] = prob
        return {"prob": prob}

    maps = MCPipeline(Doubler(), plain, spy, threshold=0.5, hole_control=control)(img, breast)
    assert seen["prob"][20, 20] == 0.0 and seen["prob"][10, 10] > 0.99
    assert maps["extras"]["hole_threshold_image"] == 0.99
    # a refiner that does not need SegAI: SegAI is not run
    sp = lambda image, prob, b: {"prob": np.clip(image - 0.5, 0, 1)}  # noqa: E731
    sp.needs = ()
    maps = MCPipeline(Doubler(), plain, sp)(img, breast)
    assert "prob" not in maps and maps["refined_mask"][10, 10]
    with pytest.raises(ValueError, match="differs from the image"):
        MCPipeline(Doubler(), plain, lambda i, p, b: {"prob": np.zeros((3, 3))})(img, breast)


def test_marks_larger_than_a_microcalcification_leave_the_refined_mask():
    from bundle.clusters import drop_large_marks

    img = np.full((64, 64), 0.5, np.float32)
    img[5:7, 5:7] = 2.0  # 4 px = 0.0196 mm^2 at 0.07 mm: an MC
    img[30:50, 30:50] = 2.0  # 400 px = 1.96 mm^2, equivalent diameter 1.58 mm: not an MC
    img[10:22, 40:42] = 2.0  # 24 px, thin: equivalent diameter 0.39 mm, kept
    ident = lambda image, prob, b: {"prob": np.clip(image - 1.0, 0, 1)}  # noqa: E731
    ident.needs = ()
    plain_maps = MCPipeline(None, None, ident, refined_threshold=0.5)(img)
    assert plain_maps["refined_mask"][40, 40] and plain_maps["refined_mask"][5, 5]
    maps = MCPipeline(None, None, ident, refined_threshold=0.5, max_mark_diameter_mm=1.0, spacing_mm=0.07)(img)
    assert not maps["refined_mask"][30:50, 30:50].any()
    assert maps["refined_mask"][5:7, 5:7].all() and maps["refined_mask"][10:22, 40:42].all()
    np.testing.assert_array_equal(maps["refined_prob"], plain_maps["refined_prob"])  # the map is not touched
    # the limit is an area: at a coarser spacing the same square is under 1 mm and stays
    assert drop_large_marks(img > 1.5, 1.0, 0.02)[40, 40]
    assert not drop_large_marks(img > 1.5, 1.0, 0.07)[40, 40]
    with pytest.raises(ValueError, match="must be > 0"):
        MCPipeline(None, None, ident, max_mark_diameter_mm=0.0)


def test_grow_threshold_restores_rims_without_adding_marks():
    img = np.full((48, 48), 1.0, np.float32)
    img[9:12, 9:12] = 1.4  # a rim of refined map 0.4 ...
    img[10, 10] = 1.9  # ... around a core of 0.9: one MC
    img[30:33, 30:33] = 1.4  # the same rim level with no core: not a mark
    img[40, 5] = 1.9  # a core without a rim
    ident = lambda image, prob, b: {"prob": np.clip(image - 1.0, 0, 1)}  # noqa: E731
    ident.needs = ()
    core = MCPipeline(None, None, ident, refined_threshold=0.6)(img)["refined_mask"]
    assert core.sum() == 2
    grown = MCPipeline(None, None, ident, refined_threshold=0.6, grow_threshold=0.3)(img)["refined_mask"]
    assert grown[9:12, 9:12].all() and grown[40, 5]
    assert not grown[30:33, 30:33].any()  # no seed, no mark
    assert grown.sum() == 9 + 1
    # a growth threshold above the rim grows nothing; an explicit threshold bypasses it (study path)
    high = MCPipeline(None, None, ident, refined_threshold=0.6, grow_threshold=0.5)(img)["refined_mask"]
    np.testing.assert_array_equal(high, core)
    pipe = MCPipeline(None, None, ident, refined_threshold=0.6, grow_threshold=0.3)
    np.testing.assert_array_equal(pipe.refine(img, None, threshold=0.6)["refined_mask"], core)
    # growth comes before the size limit: a rim that makes a mark larger than an MC removes it
    big = img.copy()
    big[15:29, 15:29] = 1.4
    big[20, 20] = 1.9
    limited = MCPipeline(None, None, ident, refined_threshold=0.6, grow_threshold=0.3,
                         max_mark_diameter_mm=1.0, spacing_mm=0.07)(big)["refined_mask"]
    assert not limited[15:29, 15:29].any() and limited[10, 10]
    with pytest.raises(ValueError, match="grow_threshold"):
        MCPipeline(None, None, ident, grow_threshold=1.5)
    with pytest.raises(ValueError, match="segai_grow_threshold"):
        MCPipeline(None, None, ident, segai_grow_threshold=-0.1)


def test_segai_grow_threshold_grows_into_segais_outline_not_the_hole_controlled_map():
    img = np.full((40, 40), 1.0, np.float32)
    img[10, 10] = 1.9  # refined core
    seg = np.zeros((40, 40), np.float32)
    seg[9:12, 9:13] = 0.6  # SegAI's outline of that MC
    seg[10, 10] = 0.95
    seg[30:32, 30:32] = 0.9  # a SegAI mark the refinement did not keep: no seed, stays out
    ident = lambda image, prob, b: {"prob": np.clip(image - 1.0, 0, 1)}  # noqa: E731
    # the hole control keeps only the core pixel; growth still reads SegAI's full map
    control = lambda p, b: {"mask": np.asarray(p) >= 0.9, "threshold": 0.9}  # noqa: E731
    kw = dict(refined_threshold=0.6, hole_control=control)
    core = MCPipeline(None, None, ident, **kw).refine(img, seg)["refined_mask"]
    assert core.sum() == 1
    grown = MCPipeline(None, None, ident, segai_grow_threshold=0.5, **kw).refine(img, seg)["refined_mask"]
    assert grown[9:12, 9:13].all() and grown.sum() == 12
    assert not grown[30:32, 30:32].any()
    high = MCPipeline(None, None, ident, segai_grow_threshold=0.7, **kw).refine(img, seg)["refined_mask"]
    np.testing.assert_array_equal(high, core)
    both = MCPipeline(None, None, ident, segai_grow_threshold=0.7, grow_threshold=0.05, **kw).refine(img, seg)
    assert both["refined_mask"].sum() == 1  # the refined map is 0 around the core: nothing to add there


def test_label_centroids_equal_scipy_center_of_mass():
    from scipy import ndimage

    from bundle.clusters import label_centroids

    rng = np.random.default_rng(3)
    labels, n = ndimage.label(rng.random((120, 90)) > 0.85, structure=np.ones((3, 3)))
    centres, sizes = label_centroids(labels, n)
    ref = np.asarray(ndimage.center_of_mass(labels > 0, labels, np.arange(1, n + 1)))
    np.testing.assert_allclose(centres, ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sizes, np.bincount(labels.ravel())[1:])
    empty, none = label_centroids(np.zeros((4, 4), np.int32), 0)
    assert empty.shape == (0, 2) and none.size == 0


@pytest.fixture(scope="module")
def one_phantom(tmp_path_factory) -> Path:
    from bundle.phantom import make_dataset

    d = tmp_path_factory.mktemp("one_phantom")
    make_dataset(d, n_cases=1, seed=777, shape=(512, 416), splits=(0, 0, 1), progress=False)
    return d


def test_inference_config_has_monai_infer_properties_and_its_evaluator_runs_the_pipeline(one_phantom, tmp_path):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"), meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"), workflow_type="infer",
        bundle_root=str(ROOT), dataset_dir=str(one_phantom), output_dir=str(tmp_path / "out"),
    )
    wf.initialize()
    assert wf.check_properties() == []
    evaluator = wf.parser.get_parsed_content("evaluator")
    outputs = []
    from ignite.engine import Events

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    evaluator.run()
    assert len(outputs) == 1
    pred = outputs[0][0]["pred"]  # channels: refined_prob, prob, virtual_normal (working grid)
    d = wf.parser.get_parsed_content("preprocessing")({"image": wf.parser.get_parsed_content("inputs")[0]["image"]})
    maps = wf.parser.get_parsed_content("pipeline")(d["image"], d["breast"])
    np.testing.assert_allclose(np.asarray(pred[0]), maps["refined_prob"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(pred[1]), maps["prob"], atol=1e-6)
    assert float(np.asarray(pred[1]).max()) > 0.5  # SegAI sees the phantom's MCs
    # the batch runner writes the same refined map (phantoms are on the working grid, left breast)
    runner = wf.parser.get_parsed_content("runner")
    out = runner.predict(wf.parser.get_parsed_content("inputs")[0]["image"])
    if out["refined_prob"].shape[-2:] == pred.shape[-2:]:
        np.testing.assert_allclose(np.asarray(out["refined_prob"][0]), np.asarray(pred[0]), atol=1e-5)


def test_grow_threshold_option_of_the_inference_config(one_phantom):
    from monai.bundle import ConfigParser
    from scipy import ndimage

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(ROOT)
    parser["dataset_dir"] = str(one_phantom)
    assert parser.get_parsed_content("pipeline").grow_threshold is None  # the default grows nothing
    d = parser.get_parsed_content("preprocessing")({"image": parser.get_parsed_content("inputs")[0]["image"]})
    pipe = parser.get_parsed_content("pipeline")
    prob = pipe.segai(d["image"], d["breast"])
    core = pipe.refine(d["image"], prob, d["breast"])
    parser["grow_threshold"] = 0.2
    grown_pipe = parser.get_parsed_content("pipeline", lazy=False)
    assert grown_pipe.grow_threshold == 0.2
    grown = grown_pipe.refine(d["image"], prob, d["breast"])
    np.testing.assert_array_equal(grown["refined_prob"], core["refined_prob"])
    a, b = core["refined_mask"], grown["refined_mask"]
    assert a.any() and (b >= a).all() and b.sum() > a.sum()  # rims added ...
    s8 = np.ones((3, 3))
    assert ndimage.label(b, s8)[1] <= ndimage.label(a, s8)[1]  # ... and no mark


def test_pipeline_inferer_returns_zeros_for_maps_it_does_not_make():
    pipe = MCPipeline(Doubler(), plain)  # no refiner
    x = torch.full((2, 1, 16, 16), 0.5)
    x[0, 0, 4, 4] = 2.0
    out = PipelineInferer(pipe, keys=("prob", "refined_prob"))(x, None, breast=torch.ones_like(x))
    assert out.shape == (2, 2, 16, 16)
    assert float(out[0, 0, 4, 4]) > 0.99 and float(out[:, 1].abs().max()) == 0.0


# the ``_real`` overlays with their base; their real datalists are replaced by a small phantom one
REAL_OVERLAYS = {"train_segai_real": "real_datalist", "train_inpainter_real": "real_clean_datalist"}


@pytest.mark.parametrize("name", ["train_segai", "train_inpainter", "train_rflow", "train_mcgenref_seg",
                                  "train_segai+train_segai_real", "train_inpainter+train_inpainter_real"])
def test_train_configs_have_monai_train_properties(name, tmp_path, monkeypatch):
    """MONAI Label and the Deploy bundle tooling drive ``train#trainer``, ``train#dataset``, ... ."""
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(ROOT)  # the configs import blocks of configs/inference.json by relative path (``%``)
    names = name.split("+")
    extra = {}
    for overlay, key in REAL_OVERLAYS.items():
        if overlay in names:
            from bundle.training import prepare_phantom_data

            extra[key] = str(prepare_phantom_data(tmp_path / "stand_in", n_cases=2, seed=5, shape=(256, 256),
                                                  splits=(1, 1, 0)))
    wf = ConfigWorkflow(
        config_file=[str(ROOT / "configs" / f"{n}.json") for n in names], meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"), workflow_type="train", bundle_root=str(ROOT),
        dataset_dir=str(tmp_path / "data"), n_cases=3, phantom_shape=[256, 256], phantom_splits=[2, 1, 0],
        output_dir=str(tmp_path / "out"), tracking_store=str(tmp_path / "mlruns"), **extra,
    )
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.parser.get_parsed_content("train#trainer").state.max_epochs == wf.parser.get_parsed_content("max_epochs")
