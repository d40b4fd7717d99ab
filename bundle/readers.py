"""Mammogram file formats and pixel readers; :class:`MammogramError`.

Recognises a file's format (:func:`image_format`, :func:`file_stem`) and decodes DICOM, PNG,
TIFF, NIfTI and MetaImage files into a 2-D array with bright = dense plus what the file says
(spacing, laterality, view, bits, photometric interpretation): ``_read_pixels`` is the one entry
point, used by :mod:`bundle.loading`. Sizes are checked before decoding (:data:`MAX_PIXELS`);
NaN/inf are refused or filled (``nan_policy``). Every reading or validation problem raises
:class:`MammogramError` so that batch runners can record it per case and go on.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = ["PathLike", "MAX_PIXELS", "MammogramError", "image_format", "file_stem"]


PathLike = Union[str, "os.PathLike[str]"]

# File name endings recognised by ``image_format`` (lower case, longest first where it matters).
_FORMAT_ENDINGS: tuple[tuple[str, str], ...] = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".dcm", "dicom"),
    (".dicom", "dicom"),
    (".dic", "dicom"),
    (".png", "png"),
    (".tiff", "tiff"),
    (".tif", "tiff"),
    (".mha", "mha"),
    (".mhd", "mha"),
)
_SIDECAR_ENDINGS: tuple[str, ...] = (".raw", ".zraw", ".img")
_COLOUR_PHOTOMETRIC = ("RGB", "YBR", "PALETTE", "HSV", "ARGB", "CMYK")
_KNOWN_VIEWS = ("CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "AT", "CV", "RL", "RM")
# Code meanings of the DICOM view code sequence (CID 4014), most specific first.
_VIEW_MEANINGS: tuple[tuple[str, str], ...] = (
    ("exaggerated laterally", "XCCL"),
    ("exaggerated medially", "XCCM"),
    ("medio-lateral oblique", "MLO"),
    ("latero-medial oblique", "LMO"),
    ("cranio-caudal", "CC"),
    ("medio-lateral", "ML"),
    ("latero-medial", "LM"),
)
_NAN_POLICIES = ("raise", "fill")
MAX_PIXELS = 120_000_000
"""Largest image accepted (rows x columns), checked before decoding: FFDM detectors have up to
about 30 Mpx and digitised films about 60; more is not one mammogram (or is a decompression bomb)."""


def _check_size(path: PathLike, rows: int, cols: int) -> None:
    """Refuse images above :data:`MAX_PIXELS` before their pixels are decoded.

    Args:
        path: the file, for the message.
        rows: declared rows.
        cols: declared columns.
    """
    if int(rows) * int(cols) > MAX_PIXELS:
        raise MammogramError(
            path, f"image too large ({rows}x{cols} px = {rows * cols / 1e6:.0f} Mpx; at most {MAX_PIXELS / 1e6:.0f} Mpx): "
            "not a single mammogram, or a decompression bomb",
        )


class MammogramError(ValueError):
    """A mammogram (or its label) cannot be read or fails validation.

    The message is ``"<path>: <problem>"``. Batch runners catch it per case, record it and go on.

    Args:
        path: the offending file (or folder).
        problem: what is wrong, in words.
    """

    def __init__(self, path: PathLike | None, problem: str) -> None:
        self.path = str(path) if path is not None else ""
        self.problem = str(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers
        return (type(self), (self.path, self.problem))


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _lower_name(path: PathLike) -> str:
    return Path(path).name.lower()


def _has_dicm_magic(path: PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def image_format(path: PathLike) -> str:
    """Guess the image format of a file from its name (and DICOM magic bytes).

    Args:
        path: file path.

    Returns:
        One of ``"dicom"``, ``"png"``, ``"tiff"``, ``"nifti"``, ``"mha"`` (MetaImage, read by ITK),
        ``"sidecar"`` (the pixel file of a ``.mhd`` header next to it) or ``"unknown"``.
        Files without a known extension are ``"dicom"`` when they carry the ``DICM`` magic or
        have no extension at all (DICOM files are often named by UID or number).
    """
    name = _lower_name(path)
    for ending, fmt in _FORMAT_ENDINGS:
        if name.endswith(ending):
            return fmt
    suffix = Path(name).suffix
    if suffix in _SIDECAR_ENDINGS:
        p = Path(path)
        if p.with_suffix(".mhd").exists() or p.with_suffix(".MHD").exists():
            return "sidecar"
    if _has_dicm_magic(path):
        return "dicom"
    if suffix == "" or suffix[1:].isdigit():  # "IM0001" or "1.2.840.113619.2.55.3"
        return "dicom"
    return "unknown"


def file_stem(path: PathLike) -> str:
    """File name without its (known) extension(s): ``a/b/case.nii.gz`` -> ``case``.

    Only recognised image extensions are removed, so DICOM files named by UID
    (``1.2.840.1234``) keep their full name.

    Args:
        path: file path.
    """
    name = Path(path).name
    low = name.lower()
    for ending, _ in _FORMAT_ENDINGS:
        if low.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return name


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    """(row, col) spacing from a number or a sequence; None when absent or invalid."""
    if value is None:
        return None
    try:
        if isinstance(value, (int, float, np.floating, np.integer)):
            vals = [float(value)] * 2
        else:
            vals = [float(v) for v in value]
            if len(vals) == 1:
                vals = vals * 2
    except (TypeError, ValueError):
        return None
    if len(vals) < 2 or not all(math.isfinite(v) and v > 0 for v in vals[:2]):
        return None
    return (vals[0], vals[1])


def _check_nan_policy(nan_policy: str) -> str:
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {_NAN_POLICIES}, got {nan_policy!r}")
    return nan_policy


def _handle_non_finite(arr: np.ndarray, path: PathLike, nan_policy: str) -> np.ndarray:
    """Raise or fill NaN/inf according to ``nan_policy``; returns a finite array."""
    if not np.issubdtype(arr.dtype, np.floating):
        return arr
    if np.isfinite(np.sum(arr, dtype=np.float64)):  # one reduction, no mask: finite values cannot overflow it
        return arr
    finite = np.isfinite(arr)
    if finite.all():
        return arr
    if nan_policy == "raise" or not finite.any():
        raise MammogramError(path, "image contains NaN/inf")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    warnings.warn(
        f"{path}: image contains {int((~finite).sum())} NaN/inf values; replaced (NaN and -inf by {lo}, +inf by {hi})",
        stacklevel=3,
    )
    return np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)


# ----------------------------------------------------------------------------------------------
# readers: each returns (2-D array with bright = dense, info dict)
# ----------------------------------------------------------------------------------------------


def _dicom_view(ds: Any) -> str:
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view:
        return view
    seq = ds.get("ViewCodeSequence")
    if seq:
        meaning = str(seq[0].get("CodeMeaning", "")).lower()
        for text, code in _VIEW_MEANINGS:
            if text in meaning:
                return code
    orient = ds.get("PatientOrientation")
    if isinstance(orient, str) and orient.strip().upper() in _KNOWN_VIEWS:  # digitised film archives
        return orient.strip().upper()
    return ""


def _dicom_output_range(ds: Any, voi: str) -> tuple[float, float] | None:
    """Theoretical value range after modality (and VOI) transforms, used to invert MONOCHROME1."""
    try:
        if voi == "lut":
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return 0.0, float(2**bits - 1)
        if ds.get("ModalityLUTSequence"):
            bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
            return 0.0, float(2**bits - 1)
        bits = int(ds.BitsStored)
        if int(ds.get("PixelRepresentation", 0)) == 1:
            lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        else:
            lo, hi = 0.0, 2.0**bits - 1
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        lo, hi = lo * slope + intercept, hi * slope + intercept
        return (min(lo, hi), max(lo, hi))
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        return None


def _identity_rescale(ds: Any) -> bool:
    """Whether the modality transform of ``ds`` is the identity (no Modality LUT, slope 1 or
    absent, intercept 0 or absent) and the stored integers fit float32 exactly (<= 24 bits)."""
    if "ModalityLUTSequence" in ds:
        return False
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return False
    return slope == 1.0 and intercept == 0.0 and int(ds.get("BitsStored", 16) or 16) <= 24


def _read_dicom(
    path: PathLike, apply_voi: bool, allowed_modalities: Sequence[str] | None, min_size: int
) -> tuple[np.ndarray, dict]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

    try:
        ds = pydicom.dcmread(str(path), force=True)
    except Exception as e:  # pydicom raises many kinds on garbage
        raise MammogramError(path, f"corrupt or unreadable DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise MammogramError(path, "not an image: no pixel data (not a DICOM image, or the file is corrupt)")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if allowed_modalities:
        allowed = tuple(m.upper() for m in allowed_modalities)
        if modality not in allowed:
            raise MammogramError(
                path, f"modality {modality or '(missing)'!r} is not one of {allowed} (not a mammogram)"
            )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or photometric.startswith(_COLOUR_PHOTOMETRIC):
        raise MammogramError(
            path, f"colour image (PhotometricInterpretation={photometric or '?'}, SamplesPerPixel={samples}) "
            "is not supported; a grey-scale mammogram is expected"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MammogramError(
            path, f"multi-frame image ({frames} frames, e.g. tomosynthesis) is not supported; a single 2-D FFDM is expected"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows and cols and (rows < min_size or cols < min_size):
        raise MammogramError(path, f"image too small ({rows}x{cols} px); at least {min_size} px per side expected")
    _check_size(path, rows, cols)
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts is not None:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as e:
            raise MammogramError(
                path, f"unsupported transfer syntax {getattr(ts, 'name', ts)} ({ts}): pydicom has no decoder for it"
            ) from e
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "an extra pydicom decoding plugin"
            raise MammogramError(
                path, f"transfer syntax {ts.name} ({ts}) cannot be decoded here: install one of: {needs}"
            )
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise MammogramError(path, f"cannot decode pixel data ({type(e).__name__}: {e}); the file may be corrupt") from e
    if arr.ndim != 2:
        raise MammogramError(path, f"pixel data has shape {arr.shape}; a single 2-D grey-scale frame is expected")
    try:
        if _identity_rescale(ds):  # the usual FFDM: skip pydicom's float64 copy (same values)
            arr = arr.astype(np.float32)
        else:
            arr = apply_modality_lut(arr, ds)
        voi = "none"
        if apply_voi:
            if ds.get("VOILUTSequence"):
                voi = "lut"
            elif "WindowCenter" in ds and "WindowWidth" in ds:
                voi = "window"
            if voi != "none":
                arr = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
    except Exception as e:
        raise MammogramError(path, f"cannot apply the modality/VOI transform ({type(e).__name__}: {e})") from e
    arr = np.asarray(arr, dtype=np.float32)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        rng = _dicom_output_range(ds, voi)
        lo, hi = rng if rng is not None else (float(arr.min()), float(arr.max()))
        arr = np.float32(lo + hi) - arr
    spacing = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        spacing = _spacing_pair(ds.get(tag))
        if spacing is not None:
            break
    laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
    info = {
        "format": "dicom",
        "spacing": spacing,
        "laterality": laterality if laterality in ("L", "R") else "U",
        "view": _dicom_view(ds),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "photometric": photometric,
        "modality": modality,
        "inverted": inverted,
        "voi_applied": voi != "none",
    }
    return arr, info


def _read_png(path: PathLike) -> tuple[np.ndarray, dict]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            _check_size(path, im.size[1], im.size[0])
            im.load()
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            mode = im.mode
            if n_frames > 1:
                raise MammogramError(path, f"multi-frame image ({n_frames} frames) is not supported")
            if mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F", "1"):
                raise MammogramError(
                    path, f"colour image (PIL mode {mode}) is not supported; save the mammogram as 8/16-bit grey-scale"
                )
            arr = np.array(im)
    except MammogramError:
        raise
    except Exception as e:
        raise MammogramError(path, f"corrupt or unreadable image file ({type(e).__name__}: {e})") from e
    one_bit = arr.dtype == bool
    if one_bit:
        arr = arr.astype(np.uint8)
    bits = 1 if one_bit else {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16, np.dtype(">u2"): 16}.get(arr.dtype, 0)
    info = {"format": "png", "spacing": None, "bits_stored": bits, "photometric": "MONOCHROME2"}
    return arr, info


def _read_tiff(path: PathLike) -> tuple[np.ndarray, dict]:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            n_pages = len(tf.pages)
            if n_pages > 1:
                raise MammogramError(path, f"multi-frame image ({n_pages} pages) is not supported")
            page = tf.pages[0]
            photometric = getattr(page.photometric, "name", str(page.photometric))
            if int(page.samplesperpixel) > 1 or photometric in ("RGB", "PALETTE", "YCBCR", "SEPARATED", "CIELAB"):
                raise MammogramError(
                    path, f"colour image (TIFF photometric {photometric}, {page.samplesperpixel} samples) is not supported"
                )
            bits = int(page.bitspersample)
            if len(page.shape) >= 2:
                _check_size(path, int(page.shape[0]), int(page.shape[1]))
            arr = page.asarray()
    except MammogramError:
        raise
    except Exception as e:
        raise MammogramError(path, f"corrupt or unreadable TIFF file ({type(e).__name__}: {e})") from e
    arr = np.squeeze(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    is_int = np.issubdtype(arr.dtype, np.integer)
    inverted = photometric == "MINISWHITE"
    if inverted:  # TIFF's MONOCHROME1
        if np.issubdtype(arr.dtype, np.integer):
            hi = float(2**bits - 1) if bits < 32 else float(np.iinfo(arr.dtype).max)
            arr = np.float32(hi) - arr.astype(np.float32)
        else:
            arr = np.float32(np.nanmax(arr) + np.nanmin(arr)) - arr.astype(np.float32)
    info = {
        "format": "tiff",
        "spacing": None,
        "bits_stored": bits if is_int else 0,
        "photometric": "MONOCHROME1" if inverted else "MONOCHROME2",
        "inverted": inverted,
    }
    return arr, info


def _squeeze_to_2d(arr: np.ndarray, spacing: list[float] | None, path: PathLike) -> tuple[np.ndarray, list | None]:
    """Drop singleton axes (leading first, then trailing) until the array is 2-D."""
    sp = list(spacing) if spacing is not None else None
    while arr.ndim > 2:
        if arr.shape[0] == 1:
            arr = arr[0]
            if sp is not None:
                sp = sp[1:]
        elif arr.shape[-1] == 1:
            arr = arr[..., 0]
            if sp is not None:
                sp = sp[:-1]
        else:
            raise MammogramError(
                path, f"not a single 2-D image (array shape {tuple(arr.shape)}): multi-frame/volume or colour data is not supported"
            )
    return arr, sp


def _read_nifti(path: PathLike) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        n_px = int(np.prod(img.shape)) if len(img.shape) else 0
        if n_px > MAX_PIXELS:
            raise MammogramError(path, f"image too large ({'x'.join(map(str, img.shape))} voxels; at most "
                                 f"{MAX_PIXELS / 1e6:.0f} M): not a single mammogram")
        arr = np.asanyarray(img.dataobj)
        zooms = [float(z) for z in img.header.get_zooms()]
    except MammogramError:
        raise
    except Exception as e:
        raise MammogramError(path, f"corrupt or unreadable NIfTI file ({type(e).__name__}: {e})") from e
    if arr.dtype.fields is not None:
        raise MammogramError(path, "colour (RGB) NIfTI image is not supported")
    zooms = (zooms + [1.0] * arr.ndim)[: arr.ndim]
    arr, sp = _squeeze_to_2d(arr, zooms, path)
    info = {"format": "nifti", "spacing": _spacing_pair(sp), "bits_stored": 0, "photometric": "MONOCHROME2"}
    return arr, info


def _read_itk(path: PathLike) -> tuple[np.ndarray, dict]:
    try:
        import itk

        img = itk.imread(str(path))
        if int(img.GetNumberOfComponentsPerPixel()) > 1:
            raise MammogramError(path, "colour/vector image is not supported; a grey-scale mammogram is expected")
        arr = np.asarray(itk.array_from_image(img))
        spacing = [float(s) for s in img.GetSpacing()][::-1]  # itk (x, y[, z]) -> numpy axis order
    except MammogramError:
        raise
    except Exception as e:
        raise MammogramError(path, f"corrupt or unreadable MetaImage/ITK file ({type(e).__name__}: {e})") from e
    arr, sp = _squeeze_to_2d(arr, spacing, path)
    info = {"format": "mha", "spacing": _spacing_pair(sp), "bits_stored": 0, "photometric": "MONOCHROME2"}
    return arr, info


def _read_pixels(
    path: PathLike,
    apply_voi: bool = False,
    allowed_modalities: Sequence[str] | None = ("MG",),
    min_size: int = 64,
) -> tuple[np.ndarray, dict]:
    """Dispatch on the file format; returns the raw 2-D array (bright = dense) and what is known."""
    p = Path(path)
    if not p.exists():
        raise MammogramError(path, "file not found")
    if not p.is_file():
        raise MammogramError(path, "not a file")
    fmt = image_format(p)
    if fmt == "dicom":
        arr, info = _read_dicom(p, apply_voi, allowed_modalities, min_size)
    elif fmt == "png":
        arr, info = _read_png(p)
    elif fmt == "tiff":
        arr, info = _read_tiff(p)
    elif fmt == "nifti":
        arr, info = _read_nifti(p)
    elif fmt == "mha":
        arr, info = _read_itk(p)
    else:
        raise MammogramError(path, "not an image: unsupported file type (expected DICOM, PNG, TIFF, NIfTI or MHA/MHD)")
    if arr.ndim != 2:
        raise MammogramError(path, f"not a single 2-D grey-scale image (array shape {tuple(arr.shape)})")
    if arr.dtype.kind not in "biuf":
        raise MammogramError(path, f"unsupported pixel type {arr.dtype}")
    if arr.shape[0] < min_size or arr.shape[1] < min_size:
        raise MammogramError(
            path, f"image too small ({arr.shape[0]}x{arr.shape[1]} px); at least {min_size} px per side expected"
        )
    info.setdefault("laterality", "U")
    info.setdefault("view", "")
    info.setdefault("modality", "")
    info.setdefault("inverted", False)
    info.setdefault("voi_applied", False)
    return arr, info
