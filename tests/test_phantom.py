"""Tests of the synthetic FFDM generator, the MC insertion model and the writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from bundle.phantom import (
    MAX_VALUE_14BIT,
    MC_SHAPES,
    inject_mcs,
    make_dataset,
    make_phantom,
    mc_profile,
    write_mg_dicom,
)

SMALL = (384, 320)
SPACING = 0.1


@pytest.fixture(scope="module")
def cc_left() -> dict:
    """A small left CC phantom with MCs."""
    return make_phantom(shape=SMALL, spacing=SPACING, view="CC", laterality="L", seed=3, n_clusters=(2, 3))


def test_output_types_and_ranges(cc_left: dict) -> None:
    img, lab, br = cc_left["image"], cc_left["label"], cc_left["breast"]
    assert img.shape == lab.shape == br.shape == SMALL
    assert img.dtype == np.uint16 and lab.dtype == np.uint8 and br.dtype == np.uint8
    assert int(img.max()) <= MAX_VALUE_14BIT
    assert set(np.unique(lab)) <= {0, 1} and set(np.unique(br)) <= {0, 1}
    assert lab.sum() > 0
    assert np.all(br[lab > 0] == 1), "MC label outside the breast"
    info = cc_left["info"]
    assert info["clusters"], "no clusters recorded"
    for cl in info["clusters"]:
        assert len(cl["centre"]) == 2 and cl["mcs"]
        for mc in cl["mcs"]:
            assert mc["shape"] in MC_SHAPES
            assert 0.1 <= mc["diameter_mm"] <= 0.7
            assert 0.0 < mc["contrast"] < 1.0
            assert mc["label_pixels"] >= 1
            r, c = (int(round(v)) for v in mc["centre"])
            win = lab[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4]
            assert win.any(), "MC centre not near a label pixel"
    json.dumps(info)  # info must be JSON serialisable


def test_determinism() -> None:
    a = make_phantom(shape=(256, 208), spacing=0.14, view="MLO", laterality="R", seed=11)
    b = make_phantom(shape=(256, 208), spacing=0.14, view="MLO", laterality="R", seed=11)
    c = make_phantom(shape=(256, 208), spacing=0.14, view="MLO", laterality="R", seed=12)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert a["info"] == b["info"]
    assert not np.array_equal(a["image"], c["image"])


def test_without_mcs_label_empty_and_same_anatomy() -> None:
    kw = dict(shape=(256, 208), spacing=0.14, view="CC", laterality="L", seed=5)
    neg = make_phantom(with_mcs=False, **kw)
    pos = make_phantom(with_mcs=True, **kw)
    assert neg["label"].sum() == 0 and neg["info"]["clusters"] == []
    assert np.array_equal(neg["breast"], pos["breast"])
    # same anatomy: the images differ only by noise away from the MCs
    far = ndi.binary_dilation(pos["label"] > 0, iterations=6) == 0
    diff = np.abs(neg["image"].astype(float) - pos["image"].astype(float))[far & (pos["breast"] > 0)]
    assert np.median(diff) < 0.05 * float(np.percentile(pos["image"][pos["breast"] > 0], 99))


def test_mcs_brighter_than_local_background(cc_left: dict) -> None:
    img = cc_left["image"].astype(np.float64)
    lab = cc_left["label"] > 0
    ring = ndi.binary_dilation(lab, iterations=5) & ~ndi.binary_dilation(lab, iterations=2)
    assert img[lab].mean() > img[ring].mean()
    # per MC (connected component) most are brighter than their ring
    comps, n = ndi.label(lab)
    brighter = 0
    for k in range(1, n + 1):
        m = comps == k
        rg = ndi.binary_dilation(m, iterations=5) & ~ndi.binary_dilation(lab, iterations=2)
        brighter += img[m].mean() > img[rg].mean()
    assert brighter >= 0.7 * n


def test_traps_not_in_label(cc_left: dict) -> None:
    traps = cc_left["info"]["traps"]
    lab = cc_left["label"]
    for r, c in traps["noise_spikes"]:
        assert lab[r, c] == 0
    r, c, _ = traps["skin_marker"]
    assert cc_left["breast"][int(r), int(c)] == 0
    assert lab[int(r), int(c)] == 0
    r0, c0, r1, c1 = traps["text_box"]
    assert lab[r0:r1, c0:c1].sum() == 0
    assert int(cc_left["image"][r0:r1, c0:c1].max()) > 10000
    plain = make_phantom(shape=SMALL, spacing=SPACING, seed=3, traps=False)
    assert "noise_spikes" not in plain["info"]["traps"]


@pytest.mark.parametrize("view", ["CC", "MLO"])
def test_laterality_orientation(view: str) -> None:
    kw = dict(shape=(256, 208), spacing=0.14, view=view, seed=7, with_mcs=False, traps=False)
    left = make_phantom(laterality="L", **kw)
    right = make_phantom(laterality="R", **kw)
    cols = np.arange(208)
    for ph, side in ((left, "L"), (right, "R")):
        w = ph["breast"].sum(axis=0).astype(float)
        cog = float((w * cols).sum() / w.sum())
        assert (cog < 104) if side == "L" else (cog > 104)
        assert ph["breast"][:, 0 if side == "L" else -1].sum() > 0, "chest wall column empty"
    assert np.array_equal(left["breast"][:, ::-1], right["breast"])
    if view == "MLO":
        assert left["info"]["pectoral"]["width_px"] > 0


def test_mc_profile_shapes() -> None:
    rng = np.random.default_rng(0)
    for shape in MC_SHAPES:
        for d_px in (1.0, 1.43, 4.0, 10.0):
            p = mc_profile(shape, d_px, rng, offset=(rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)))
            assert p.ndim == 2 and p.shape[0] == p.shape[1] and p.shape[0] % 2 == 1
            assert 0.0 < p.max() <= 1.0 and p.min() >= 0.0
    with pytest.raises(ValueError):
        mc_profile("star", 3.0, rng)


def _background(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.normal(0, 1, shape), 4) * 200 + 4000 + rng.normal(0, 20, shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    breast = ((yy - shape[0] / 2) / (0.45 * shape[0])) ** 2 + (xx / (0.9 * shape[1])) ** 2 < 1
    return img.astype(np.float32), breast.astype(np.uint8)


def test_inject_mcs_respects_masks() -> None:
    img, breast = _background((300, 260), 1)
    avoid = np.zeros_like(breast)
    avoid[100:200, 40:160] = 1
    out, lab, clusters = inject_mcs(
        img, breast, 0.1, np.random.default_rng(4), n_clusters=3, avoid=avoid, cluster_extent_mm=(3, 6)
    )
    assert out.dtype == np.float32 and lab.dtype == np.uint8 and out.shape == img.shape
    assert len(clusters) >= 1 and lab.sum() > 0
    assert np.all(breast[lab > 0] == 1)
    assert np.all(avoid[lab > 0] == 0)
    changed = np.abs(out - img) > 1e-3
    assert not changed[ndi.binary_dilation(lab > 0, iterations=6) == 0].any(), "image changed far from MCs"
    assert np.all(out >= img - 1e-3), "MCs must only add brightness"
    n_mcs = sum(len(c["mcs"]) for c in clusters)
    _, n_comp = ndi.label(lab)
    assert n_comp >= 0.8 * n_mcs
    # deterministic for the same generator seed, and the input is not modified
    out2, lab2, _ = inject_mcs(img, breast, 0.1, np.random.default_rng(4), n_clusters=3, avoid=avoid, cluster_extent_mm=(3, 6))
    assert np.array_equal(out, out2) and np.array_equal(lab, lab2)


def test_inject_mcs_contrast_model() -> None:
    img, breast = _background((200, 200), 2)
    img[:] = 1000.0
    gain = 500.0
    out, lab, clusters = inject_mcs(
        img, breast, 0.07, np.random.default_rng(0), n_clusters=1, contrast=0.3, diameter_mm=0.6,
        mcs_per_cluster=3, gain=gain, psf_sigma_px=0.0,
    )
    # without blur the peak of a full-thickness MC is exactly -gain * log(1 - c)
    assert np.isclose(out.max() - 1000.0, -gain * np.log(1 - 0.3), rtol=0.05)
    assert np.all(lab[out - 1000.0 > -gain * np.log(1 - 0.3 * 0.5) + 1e-3] == 1)
    # an 8-bit-like image with no room: nothing is placed when the breast is empty
    out3, lab3, cl3 = inject_mcs(img, np.zeros_like(breast), 0.07, np.random.default_rng(0))
    assert cl3 == [] and lab3.sum() == 0 and np.array_equal(out3, img)


@pytest.mark.parametrize(
    "photometric,rle", [("MONOCHROME2", False), ("MONOCHROME1", False), ("MONOCHROME1", True), ("MONOCHROME2", True)]
)
def test_dicom_round_trip(tmp_path: Path, photometric: str, rle: bool) -> None:
    pydicom = pytest.importorskip("pydicom")
    ph = make_phantom(shape=(256, 208), spacing=0.14, view="MLO", laterality="R", seed=2)
    path = tmp_path / "x.dcm"
    write_mg_dicom(path, ph["image"], 0.14, "R", "MLO", seed=9, photometric=photometric, rle=rle, use_imager_spacing=rle)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "MG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.ImageLaterality == "R" and ds.ViewPosition == "MLO"
    assert ds.BitsAllocated == 16 and ds.BitsStored == 14 and ds.HighBit == 13 and ds.PixelRepresentation == 0
    assert ds.PhotometricInterpretation == photometric
    assert (ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5") == rle
    sp = ds.ImagerPixelSpacing if rle else ds.PixelSpacing
    assert [float(v) for v in sp] == [0.14, 0.14]
    assert ("PixelSpacing" in ds) != rle
    arr = ds.pixel_array.astype(np.int64)
    if photometric == "MONOCHROME1":
        arr = (1 << ds.BitsStored) - 1 - arr
    assert np.array_equal(arr, ph["image"].astype(np.int64))
    # deterministic UIDs and bytes
    path2 = tmp_path / "y.dcm"
    write_mg_dicom(path2, ph["image"], 0.14, "R", "MLO", seed=9, photometric=photometric, rle=rle, use_imager_spacing=rle)
    assert path.read_bytes() == path2.read_bytes()
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_dicom_no_spacing_and_validation(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    px = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4000
    write_mg_dicom(tmp_path / "a.dcm", px, None, "L", "CC")
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert "PixelSpacing" not in ds and "ImagerPixelSpacing" not in ds
    assert ds.PatientID == "PHANTOM" and ds.PatientSex == "F"
    with pytest.raises(ValueError):
        write_mg_dicom(tmp_path / "b.dcm", px + 20000, 0.1, "L", "CC")
    with pytest.raises(ValueError):
        write_mg_dicom(tmp_path / "c.dcm", px, 0.1, "X", "CC")


def test_make_dataset(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    nib = pytest.importorskip("nibabel")
    out = tmp_path / "ds"
    path = make_dataset(out, 5, seed=4, shape=(192, 160), spacing=0.2, splits=(3, 1, 1), progress=False)
    dl = json.loads(path.read_text())
    assert set(dl) == {"training", "validation", "test"}
    assert [len(dl[k]) for k in ("training", "validation", "test")] == [3, 1, 1]
    for item in dl["training"] + dl["validation"] + dl["test"]:
        assert set(item) == {"image", "label"}
        ds = pydicom.dcmread(out / item["image"])
        lab = nib.load(out / item["label"])
        assert lab.shape == (ds.Rows, ds.Columns)
        assert lab.get_data_dtype() == np.uint8
        assert np.allclose(np.diag(lab.affine)[:2], 0.2)
    # the same seed gives identical pixel data
    path2 = make_dataset(tmp_path / "ds2", 5, seed=4, shape=(192, 160), spacing=0.2, splits=(3, 1, 1), progress=False)
    for item in dl["training"]:
        a = pydicom.dcmread(out / item["image"]).PixelData
        b = pydicom.dcmread(path2.parent / item["image"]).PixelData
        assert a == b
    cases = json.loads((out / "cases.json").read_text())
    assert len(cases) == 5 and {c["split"] for c in cases} == {"training", "validation", "test"}
    with pytest.raises(ValueError):
        make_dataset(tmp_path / "bad", 3, splits=(0.5, 0.1, 0.1), progress=False)


def test_label_alignment_with_dicom(tmp_path: Path) -> None:
    """The NIfTI label must overlay the MCs of pixel_array[r, c] (no transposition)."""
    pydicom = pytest.importorskip("pydicom")
    nib = pytest.importorskip("nibabel")
    path = make_dataset(tmp_path, 2, seed=8, shape=(256, 208), spacing=0.14, splits=(2, 0, 0), progress=False)
    for item in json.loads(path.read_text())["training"]:
        ds = pydicom.dcmread(tmp_path / item["image"])
        arr = ds.pixel_array.astype(float)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = (1 << ds.BitsStored) - 1 - arr
        lab = np.asarray(nib.load(tmp_path / item["label"]).dataobj) > 0
        if lab.any():
            ring = ndi.binary_dilation(lab, iterations=5) & ~ndi.binary_dilation(lab, iterations=2)
            assert arr[lab].mean() > arr[ring].mean()


NEGATIVES_DIR = Path(os.environ.get("MCREF_NEGATIVES_DIR", "_no_negatives_dir_"))


@pytest.mark.skipif(not NEGATIVES_DIR.is_dir(), reason="set MCREF_NEGATIVES_DIR to a folder of real negative PNGs")
def test_inject_into_real_negative() -> None:
    from PIL import Image

    png = sorted(NEGATIVES_DIR.glob("*.png"))[0]
    img = np.asarray(Image.open(png).convert("L"))[::4, ::4].astype(np.float32) * 64.0
    breast = ndi.binary_opening(img > 20 * 64, iterations=2)
    out, lab, clusters = inject_mcs(img, breast, 0.4, np.random.default_rng(0), diameter_mm=(0.4, 0.7), cluster_extent_mm=(6, 10))
    assert lab.sum() > 0 and np.all(breast[lab > 0])


def _load_script(name: str):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_mcref_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def test_make_demo_data_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mod = _load_script("make_demo_data")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0 and "--no-mcs" in capsys.readouterr().out
    rc = mod.main(["--out", str(tmp_path), "--n", "2", "--rows", "160", "--cols", "128", "--spacing", "0.25",
                   "--no-mcs", "--no-progress", "--splits", "0.5", "0.5", "0"])
    assert rc == 0
    dl = json.loads((tmp_path / "datalist.json").read_text())
    assert len(dl["training"]) == 1 and len(dl["validation"]) == 1 and dl["test"] == []
    nib = pytest.importorskip("nibabel")
    assert np.asarray(nib.load(tmp_path / dl["training"][0]["label"]).dataobj).sum() == 0


def test_make_injected_negatives_cli(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    nib = pytest.importorskip("nibabel")
    from PIL import Image

    mod = _load_script("make_injected_negatives")
    png_dir = tmp_path / "png"
    png_dir.mkdir()
    # an 8-bit "right CC" stored mirrored (chest wall on the left), as in the NYU sample
    ph = make_phantom(shape=(320, 256), spacing=0.2, view="CC", laterality="L", seed=1, with_mcs=False, traps=False)
    Image.fromarray((ph["image"] // 64).astype(np.uint8)).save(png_dir / "R-CC.png")
    out = tmp_path / "out"
    rc = mod.main(["--png-dir", str(png_dir), "--png-spacing", "0.2", "--out", str(out), "--seed", "1",
                   "--splits", "1", "0", "0", "--clusters", "1", "1"])
    assert rc == 0
    item = json.loads((out / "datalist.json").read_text())["training"][0]
    ds = pydicom.dcmread(out / item["image"])
    assert ds.ImageLaterality == "R" and ds.ViewPosition == "CC" and ds.BitsStored == 14
    arr = ds.pixel_array
    lab = np.asarray(nib.load(out / item["label"]).dataobj)
    assert lab.shape == arr.shape and lab.sum() > 0
    # flipped back: chest wall (the breast) on the right for a right breast
    breast = ph["breast"][:, ::-1] > 0
    cols = np.arange(arr.shape[1])
    assert float((breast.sum(0) * cols).sum() / breast.sum()) > arr.shape[1] / 2
    assert np.all(breast[lab > 0])
    cases = json.loads((out / "cases.json").read_text())
    assert cases[0]["flipped"] is True


def test_mlo_mcs_outside_pectoral() -> None:
    ph = make_phantom(shape=(320, 256), spacing=0.2, view="MLO", laterality="L", seed=6, n_clusters=(3, 3))
    pec = ph["info"]["pectoral"]
    rows, cols = np.nonzero(ph["label"])
    assert rows.size > 0
    # the muscle lies in the top-left triangle (border straight to slightly convex)
    assert np.all(cols / pec["width_px"] + rows / pec["height_px"] > 0.95)


def test_make_injected_negatives_protocol(tmp_path: Path) -> None:
    """--protocol writes a clean and injected copies per named view into its fixed split."""
    nib = pytest.importorskip("nibabel")
    from PIL import Image

    mod = _load_script("make_injected_negatives")
    png_dir = tmp_path / "png"
    png_dir.mkdir()
    for k, name in enumerate(["L-CC", "R-CC", "L-MLO"]):
        ph = make_phantom(shape=(320, 256), spacing=0.2, view="CC", laterality="L", seed=10 + k, with_mcs=False, traps=False)
        Image.fromarray((ph["image"] // 64).astype(np.uint8)).save(png_dir / f"{name}.png")
    proto = {"training": ["L-CC"], "validation": ["R-CC"], "test": ["L-MLO"],
             "variants": {"training": 2, "validation": 1, "test": 1}, "seeds": {"training": 1, "validation": 2, "test": 3}}
    pf = tmp_path / "protocol.json"
    pf.write_text(json.dumps(proto))
    out = tmp_path / "out"
    rc = mod.main(["--png-dir", str(png_dir), "--png-spacing", "0.2", "--out", str(out), "--protocol", str(pf),
                   "--clusters", "1", "1"])
    assert rc == 0
    dl = json.loads((out / "datalist.json").read_text())
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [3, 2, 2]
    assert {e["view"] for e in dl["test"]} == {"L-MLO"} and {e["view"] for e in dl["training"]} == {"L-CC"}
    for split in dl:
        for e in dl[split]:
            lab = np.asarray(nib.load(out / e["label"]).dataobj)
            assert (lab.sum() == 0) == (e["kind"] == "clean")
            assert (out / split / e["image"]).exists()  # one folder per split for the main command
    clean = json.loads((out / "datalist_clean.json").read_text())
    assert all(e["kind"] == "clean" for s in clean.values() for e in s) and len(clean["training"]) == 1
    # a view in two splits, or one that does not exist, is refused
    pf.write_text(json.dumps({**proto, "test": ["L-CC"]}))
    with pytest.raises(SystemExit, match="more than one split"):
        mod.main(["--png-dir", str(png_dir), "--png-spacing", "0.2", "--out", str(tmp_path / "o2"), "--protocol", str(pf)])
    pf.write_text(json.dumps({**proto, "test": ["X-CC"]}))
    with pytest.raises(SystemExit, match="not found"):
        mod.main(["--png-dir", str(png_dir), "--png-spacing", "0.2", "--out", str(tmp_path / "o3"), "--protocol", str(pf)])


def test_rand_acquisition_changes_crops_reproducibly() -> None:
    import torch

    from bundle.training import RandAcquisitiond

    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.uniform(0, 1, (1, 64, 64)).astype(np.float32))
    a = RandAcquisitiond(prob=1.0, seed=5)({"image": x, "label": x})
    b = RandAcquisitiond(prob=1.0, seed=5)({"image": x, "label": x})
    assert torch.equal(a["image"], b["image"])  # seeded
    assert a["image"].shape == x.shape and a["image"].dtype == torch.float32
    assert not torch.allclose(a["image"], x, atol=1e-3)
    assert torch.equal(a["label"], x)  # only the keys asked for
    off = RandAcquisitiond(prob=0.0)({"image": x})
    assert torch.allclose(off["image"], x)
    with pytest.raises(ValueError, match="prob"):
        RandAcquisitiond(prob=1.5)
