"""SegAI's optional OpenVINO runtime (segai_backend "openvino") against the torch path.

Tolerances: OpenVINO compiles the export in f32 but sums in another order than torch, so the
numbers differ by rounding only. Measured with the shipped weights on a 2-core AVX-512 CPU: logits
of random tiles within 1.5e-3; the phantom's whole probability map within 7.5e-4 (instance norm
amplifies rounding on flat tiles), mask Dice 1.0 at the threshold. The tests allow 1e-2 on logits
and 5e-3 on probabilities (other CPUs take other kernels) and ask for a mask Dice of at least 0.99
at the SegAI threshold of configs/inference.json; a stale export (weights retrained since the
export) differs by far more.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.inferers import BreastTileInferer
from bundle.runtime import EXPORT_COMMAND, OpenVINONetwork, build_segai_runtime

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT / "models" / "model.onnx"
LOGIT_ATOL = 1e-2
PROB_ATOL = 5e-3
MIN_DICE = 0.99

needs_openvino = pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None,
    reason="OpenVINO not installed (pip install -e .[openvino]; the test extra includes it)",
)


def _parser(**overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(ROOT)
    parser["refine"] = False
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _segai_net():
    """The torch SegAI exactly as inference builds it (weights of models/model.pt, batch norms
    folded, channels-last), so the ONNX export is checked against what the torch backend runs."""
    return _parser().get_parsed_content("network")


def test_torch_is_the_default_backend():
    parser = _parser()
    assert parser["segai_backend"] == "torch"
    inf = parser.get_parsed_content("inferer")
    assert inf.backend == "torch" and inf.runtime is None


def test_unknown_backend_and_autocast_with_openvino_are_refused():
    with pytest.raises(ValueError, match="one of"):
        BreastTileInferer(backend="tensorrt")
    with pytest.raises(ValueError, match="torch backend only"):
        BreastTileInferer(backend="openvino", onnx_path=str(ONNX), autocast_dtype="bfloat16")
    with pytest.raises(ValueError, match="needs onnx_path"):
        build_segai_runtime("openvino", None)


def test_missing_openvino_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[openvino\]"):
        BreastTileInferer(backend="openvino", onnx_path=str(ONNX))


@needs_openvino
def test_missing_onnx_file_gives_the_export_command(tmp_path):
    missing = tmp_path / "model.onnx"
    with pytest.raises(FileNotFoundError, match="onnx_export") as e:
        OpenVINONetwork(missing)
    assert str(missing) in str(e.value) and EXPORT_COMMAND in str(e.value)
    parser = _parser(segai_backend="openvino", onnx_path=str(missing))
    with pytest.raises(Exception) as e:  # MONAI wraps it in "Failed to instantiate ..."
        parser.get_parsed_content("inferer")
    chain = []
    err: BaseException | None = e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__
    assert any(isinstance(x, FileNotFoundError) and "ONNX export not found" in str(x) for x in chain)


@needs_openvino
def test_shipped_onnx_is_in_sync_with_model_pt():
    """models/model.onnx gives model.pt's logits: re-export (docs/training.md) after retraining."""
    assert ONNX.is_file(), f"{ONNX} missing; make it with: {EXPORT_COMMAND}"
    net = _segai_net()
    ov_net = OpenVINONetwork(ONNX)
    g = torch.Generator().manual_seed(15)
    # dynamic axes: batch, height and width other than the export's (1, 1, 512, 512)
    for shape in [(2, 1, 512, 512), (1, 1, 256, 384)]:
        x = torch.randn(shape, generator=g) * 0.5 + 0.5
        with torch.no_grad():
            ref = net(x)
        out = ov_net(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        diff = float((out - ref).abs().max())
        assert diff <= LOGIT_ATOL, f"{shape}: max logit difference {diff:.4g} > {LOGIT_ATOL}: stale export? {EXPORT_COMMAND}"
    # the wrapper hands back its own copy: a second call does not change the first result
    a = ov_net(x)
    a0 = a.clone()
    ov_net(torch.zeros_like(x))
    torch.testing.assert_close(a, a0)


@needs_openvino
def test_a_copy_of_the_export_loads_from_anywhere(tmp_path):
    p = tmp_path / "segai.onnx"
    shutil.copy(ONNX, p)
    ov_net = OpenVINONetwork(p, num_threads=1)
    assert ov_net.onnx_path == p and ov_net.num_threads == 1 and len(ov_net.onnx_sha256) == 64
    assert ov_net(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


@pytest.fixture(scope="module")
def phantom_case():
    """A seeded phantom with MCs through the bundle's preprocessing: (image, breast) on the working grid."""
    from bundle.phantom import make_phantom, write_mg_dicom

    ph = make_phantom(shape=(1024, 832), spacing=0.07, view="CC", laterality="L", seed=4015)
    d = Path(__import__("tempfile").mkdtemp(prefix="mcref_runtime_"))
    write_mg_dicom(d / "case.dcm", ph["image"], spacing=0.07, laterality="L", view="CC", seed=4015)
    data = _parser().get_parsed_content("preprocessing")({"image": str(d / "case.dcm")})
    shutil.rmtree(d, ignore_errors=True)
    return data["image"], data["breast"]


@needs_openvino
def test_openvino_probability_map_equals_the_torch_path(phantom_case):
    image, breast = phantom_case
    maps = {}
    for backend in ("torch", "openvino"):
        parser = _parser(segai_backend=backend)
        pipeline = parser.get_parsed_content("pipeline")
        maps[backend] = pipeline.segai(image, breast)
        threshold = float(parser.get_parsed_content("threshold"))
    t, o = maps["torch"], maps["openvino"]
    assert t.shape == o.shape == tuple(image.shape[-2:])
    diff = float(np.abs(t - o).max())
    assert diff <= PROB_ATOL, f"max probability difference {diff:.3g} > {PROB_ATOL}"
    mt, mo = t >= threshold, o >= threshold
    assert mt.sum() > 0, "the phantom should light SegAI up somewhere"
    dice = 2.0 * float((mt & mo).sum()) / float(mt.sum() + mo.sum())
    assert dice >= MIN_DICE, f"mask Dice {dice:.4f} at threshold {threshold} < {MIN_DICE}"
