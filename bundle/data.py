"""Reading, orienting, resampling and normalising mammograms; breast masks; INbreast labels; writers.

Everything here keeps to ``docs/architecture.md``: a loaded mammogram is a
``monai.data.MetaTensor`` of shape ``(1, H, W)``, ``float32``, with ``image[0, r, c]`` equal to
the source ``pixel_array[r, c]`` (never transposed), "bright = dense", and plain python meta
data (``filename_or_obj``, ``stem``, ``spacing`` (row, col) in mm, ``original_shape``,
``laterality``, ``view``, ``bits_stored``, ``photometric``, ``modality``; ``flip_lr``,
``working_shape`` and ``working_spacing`` are added by the geometry transforms).

Reading and validation problems raise :class:`MammogramError` so that batch runners can record
them per case and go on.
"""

from __future__ import annotations

import json
import math
import os
import plistlib
import re
import uuid
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, MapTransform
from monai.utils import ensure_tuple, ensure_tuple_rep
from scipy import ndimage

__all__ = [
    "MammogramError",
    "image_format",
    "file_stem",
    "read_mammogram",
    "LoadMammogramd",
    "chest_wall_on_right",
    "OrientBreastd",
    "ResampleToSpacingd",
    "compute_breast_mask",
    "check_grey_levels",
    "large_scale_structure",
    "BreastMaskd",
    "NormalizeMammogramd",
    "RestoreGeometryd",
    "read_inbreast_xml",
    "LoadINbreastLabeld",
    "load_datalist",
    "list_images",
    "save_nifti_atomic",
    "save_png_atomic",
    "mammogram_preprocessing",
]

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


def _as_tensor(x: Any) -> torch.Tensor:
    """A plain torch tensor (no meta) from a MetaTensor, tensor or array."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _meta_of(x: Any) -> dict:
    return dict(x.meta) if isinstance(x, MetaTensor) else {}


def _meta_tensor(t: torch.Tensor, affine: Any, meta: Mapping) -> MetaTensor:
    """A MetaTensor with its own copy of ``meta`` (MetaTensor keeps the dict it is given) and ``affine``."""
    m = {k: v for k, v in meta.items() if k != "affine"}
    return MetaTensor(t, affine=affine, meta=m)


def _affine_with(affine: torch.Tensor | None, mat: np.ndarray) -> torch.Tensor:
    """``affine @ mat`` where ``mat`` is a 3x3 (row, col, 1) index transform; any affine size."""
    if affine is None:
        affine = torch.eye(3, dtype=torch.float64)
    a = torch.as_tensor(affine, dtype=torch.float64)
    n = a.shape[-1]
    m = torch.eye(n, dtype=torch.float64)
    m[:2, :2] = torch.as_tensor(mat[:2, :2])
    m[:2, n - 1] = torch.as_tensor(mat[:2, 2])
    return a @ m


def _ref_meta(d: Mapping, ref_key: Hashable) -> dict:
    """Meta data of ``d[ref_key]`` (a MetaTensor or a plain dict), or ``d[f"{ref_key}_meta_dict"]``."""
    ref = d.get(ref_key)
    if isinstance(ref, MetaTensor):
        return dict(ref.meta)
    if isinstance(ref, Mapping):
        return dict(ref)
    alt = d.get(f"{ref_key}_meta_dict")
    if isinstance(alt, Mapping):
        return dict(alt)
    raise KeyError(f"no meta data found for reference key {ref_key!r}")


def _path_of(meta: Mapping) -> str:
    return str(meta.get("filename_or_obj", ""))


def _check_nan_policy(nan_policy: str) -> str:
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {_NAN_POLICIES}, got {nan_policy!r}")
    return nan_policy


def _handle_non_finite(arr: np.ndarray, path: PathLike, nan_policy: str) -> np.ndarray:
    """Raise or fill NaN/inf according to ``nan_policy``; returns a finite array."""
    if not np.issubdtype(arr.dtype, np.floating):
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


def _grey_levels(arr: np.ndarray) -> tuple[int, float, float]:
    """``(number of distinct values capped at 3, min, max)`` of a finite array, in two passes.

    Args:
        arr: the finite 2-D pixel array.
    """
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        return 1, lo, hi
    return (3 if bool(((arr > lo) & (arr < hi)).any()) else 2), lo, hi


def check_grey_levels(meta: Mapping[str, Any]) -> None:
    """Refuse blank (one value), binary (two values) and 1-bit images: none can be a mammogram.

    Uses ``grey_levels``, ``value_range`` and ``bits_stored`` recorded by :func:`read_mammogram`
    (labels are read by the same function and may be binary, so images are checked here, by
    :class:`BreastMaskd`); meta data without ``grey_levels`` passes.

    Args:
        meta: the image's meta data.

    Raises:
        MammogramError: naming the file and what was found.
    """
    path = _path_of(meta)
    levels = meta.get("grey_levels")
    lo, hi = (list(meta.get("value_range", (0.0, 0.0))) + [0.0, 0.0])[:2]
    if int(meta.get("bits_stored", 0) or 0) == 1:
        raise MammogramError(path, "1-bit (binary) image: not a mammogram (a mask or a fax-style scan?)")
    if levels == 1:
        raise MammogramError(path, f"blank image: every pixel is {float(lo):g}; not a mammogram")
    if levels == 2:
        raise MammogramError(
            path, f"binary image (only the grey levels {float(lo):g} and {float(hi):g}): not a mammogram (a mask?)"
        )


def read_mammogram(
    path: PathLike,
    spacing: float | Sequence[float] | None = None,
    apply_voi: bool = False,
    allowed_modalities: Sequence[str] | None = ("MG",),
    min_size: int = 64,
    nan_policy: str = "raise",
) -> MetaTensor:
    """Read one mammogram file as a ``(1, H, W)`` float32 MetaTensor with the project's meta data.

    Args:
        path: DICOM, PNG, TIFF, NIfTI (``.nii``/``.nii.gz``) or MetaImage (``.mha``/``.mhd``) file.
        spacing: pixel spacing override in mm (a number or (row, col)); wins over the file's value.
            Required for PNG/TIFF, which carry no usable spacing.
        apply_voi: apply the DICOM VOI LUT / window (off by default: raw values).
        allowed_modalities: DICOM modalities accepted (``None`` or empty accepts any).
        min_size: minimum number of pixels per side.
        nan_policy: ``"raise"`` (MammogramError) or ``"fill"`` (replace, with a warning) for NaN/inf.

    Raises:
        MammogramError: when the file is missing, unreadable, not a suitable image or lacks spacing.
    """
    _check_nan_policy(nan_policy)
    arr, info = _read_pixels(path, apply_voi, allowed_modalities, min_size)
    override = _spacing_pair(spacing)
    if spacing is not None and override is None:
        raise ValueError(f"invalid spacing override {spacing!r}; give a positive number or (row, col) in mm")
    sp = override if override is not None else info["spacing"]
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        arr = _handle_non_finite(arr, path, nan_policy)
    arr32 = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr32).all():  # e.g. float64 values beyond float32 range
        arr32 = _handle_non_finite(arr32, path, nan_policy)
    levels, lo, hi = _grey_levels(arr32)
    if sp is None:
        if levels <= 2 or int(info["bits_stored"]) == 1:  # the more basic problem first
            check_grey_levels({"filename_or_obj": str(path), "grey_levels": levels, "value_range": (lo, hi),
                               "bits_stored": info["bits_stored"]})
        where = ("PixelSpacing/ImagerPixelSpacing missing or not positive" if info["format"] == "dicom"
                 else f"a {info['format'].upper()} file has none")
        raise MammogramError(
            path, f"no pixel spacing ({where}); give it with --pixel_spacing (mm), e.g. --pixel_spacing 0.07"
        )
    affine = torch.diag(torch.tensor([sp[0], sp[1], 1.0], dtype=torch.float64))
    meta = {
        "filename_or_obj": str(path),
        "stem": file_stem(path),
        "format": info["format"],
        "spacing": (float(sp[0]), float(sp[1])),
        "original_shape": (int(arr32.shape[0]), int(arr32.shape[1])),
        "original_affine": affine.numpy().copy(),
        "laterality": info["laterality"],
        "view": info["view"],
        "bits_stored": int(info["bits_stored"]),
        "photometric": info["photometric"],
        "modality": info["modality"],
        "inverted": bool(info["inverted"]),
        "voi_applied": bool(info["voi_applied"]),
        "grey_levels": int(levels),
        "value_range": (lo, hi),
    }
    return _meta_tensor(torch.from_numpy(arr32)[None], affine, meta)


class LoadMammogramd(MapTransform):
    """Load mammogram files named in ``data[key]`` as ``(1, H, W)`` float32 MetaTensors.

    Formats: DICOM (compressed syntaxes through pydicom's pylibjpeg plugins), PNG, TIFF (8/16 bit),
    NIfTI and MetaImage. DICOM: rescale slope/intercept (modality LUT) applied, VOI only with
    ``apply_voi``, MONOCHROME1 inverted, spacing from PixelSpacing, else ImagerPixelSpacing,
    else NominalScannedPixelSpacing. See ``docs/data.md`` for the meta data.

    Args:
        keys: keys whose values are file paths.
        spacing: pixel spacing override in mm (number or (row, col)); wins over the file's value.
        apply_voi: apply the DICOM VOI LUT / window.
        allowed_modalities: accepted DICOM modalities (``None`` accepts any).
        min_size: minimum pixels per side.
        nan_policy: ``"raise"`` or ``"fill"`` for NaN/inf in float images.
        meta_keys: where to put a copy of the meta dict when ``image_only`` is False
            (default ``f"{key}_{meta_key_postfix}"``).
        meta_key_postfix: postfix for the default meta keys.
        image_only: when False, also store the meta dict under the meta key (MONAI style).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spacing: float | Sequence[float] | None = None,
        apply_voi: bool = False,
        allowed_modalities: Sequence[str] | None = ("MG",),
        min_size: int = 64,
        nan_policy: str = "raise",
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = "meta_dict",
        image_only: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing = spacing
        self.apply_voi = apply_voi
        self.allowed_modalities = tuple(allowed_modalities) if allowed_modalities else None
        self.min_size = int(min_size)
        self.nan_policy = _check_nan_policy(nan_policy)
        self.meta_keys = ensure_tuple_rep(None, len(self.keys)) if meta_keys is None else ensure_tuple(meta_keys)
        if len(self.meta_keys) != len(self.keys):
            raise ValueError("meta_keys should have the same length as keys")
        self.meta_key_postfix = meta_key_postfix
        self.image_only = image_only

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each path by the loaded MetaTensor."""
        d = dict(data)
        for key, meta_key in self.key_iterator(d, self.meta_keys):
            src = d[key]
            if not isinstance(src, (str, os.PathLike)):
                raise TypeError(f"LoadMammogramd expects a file path in data[{key!r}], got {type(src).__name__}")
            img = read_mammogram(
                src, self.spacing, self.apply_voi, self.allowed_modalities, self.min_size, self.nan_policy
            )
            d[key] = img
            if not self.image_only:
                d[meta_key or f"{key}_{self.meta_key_postfix}"] = dict(img.meta)
        return d


# ----------------------------------------------------------------------------------------------
# orientation
# ----------------------------------------------------------------------------------------------


def _downsample(arr: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Block-mean downsample so that the longer side is at most ``max_side``; returns (small, factor)."""
    h, w = arr.shape
    f = max(1, math.ceil(max(h, w) / max_side))
    if f == 1:
        return arr.astype(np.float32, copy=False), 1
    hp, wp = math.ceil(h / f) * f, math.ceil(w / f) * f
    pad = np.pad(arr, ((0, hp - h), (0, wp - w)), mode="edge")
    return pad.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32), f


def _foreground(small: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """Otsu foreground of a robustly clipped image; returns (fg, threshold, background level)."""
    from skimage.filters import threshold_otsu

    lo, hi = np.percentile(small, [0.5, 99.5])
    if not hi > lo:
        return None
    clipped = np.clip(small, lo, hi)
    t = float(threshold_otsu(clipped))
    below = clipped[clipped <= t]
    bg = float(np.median(below)) if below.size else float(lo)
    return clipped > t, t, bg


def chest_wall_on_right(
    image: np.ndarray | torch.Tensor, laterality: str = "U", method: str = "laterality", path: PathLike | None = None
) -> bool:
    """Decide whether the chest wall is on the right-hand side (high column indices).

    The image content is judged twice: by the breast mass in the two column halves and by the
    image border the tissue touches (a breast lies against the detector edge at the chest wall
    only). When a laterality tag and the image clearly disagree (3x more tissue on the other
    half, or tissue along the other border only) a warning naming the file is issued.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` image, bright = dense.
        laterality: ``"L"``, ``"R"`` or ``"U"``. For presentation images the right breast has
            its chest wall on the right.
        method: ``"laterality"`` (laterality when known, else image content) or ``"intensity"``
            (image content only: breast mass in the left vs right column halves).
        path: the source file, named in the warnings.

    Returns:
        True when the columns must be reversed to bring the chest wall to column 0.
    """
    if method not in ("laterality", "intensity"):
        raise ValueError(f"method must be 'laterality' or 'intensity', got {method!r}")
    arr = _as_tensor(image).detach().cpu().float().numpy()
    arr = arr.reshape(arr.shape[-2:])
    small, _ = _downsample(arr, 512)
    by_image: bool | None = None
    ratio = 1.0
    touch = (0.0, 0.0)  # fraction of rows whose tissue reaches the left / right border
    fg = _foreground(small) if np.isfinite(small).all() else None
    if fg is not None:
        mask, _, bg = fg
        weight = np.clip(small - bg, 0, None) * mask
        w = weight.shape[1]
        left, right = float(weight[:, : w // 2].sum()), float(weight[:, w - w // 2 :].sum())
        by_image = right > left
        ratio = (max(left, right) + 1e-6) / (min(left, right) + 1e-6)
        margin = max(2, round(0.02 * w))
        touch = (float(mask[:, :margin].any(axis=1).mean()), float(mask[:, -margin:].any(axis=1).mean()))
    lat = str(laterality).upper()
    where = f"{path}: " if path else ""
    if method == "laterality" and lat in ("L", "R"):
        by_lat = lat == "R"
        tagged, other = (touch[1], touch[0]) if by_lat else (touch[0], touch[1])
        by_border = tagged < 0.15 and other > 0.35
        if by_image is not None and by_image != by_lat and (ratio > 3.0 or by_border):
            side = "right" if by_lat else "left"
            warnings.warn(
                f"{where}laterality tag {lat} puts the chest wall on the {side}, but the image has its tissue on "
                f"the other side ({ratio:.1f}x more tissue there; it touches the {side} border in "
                f"{100 * tagged:.0f} % of rows, the other border in {100 * other:.0f} %); following the tag, "
                "check the image's laterality",
                stacklevel=2,
            )
        return by_lat
    if by_image is None:
        warnings.warn(f"{where}cannot decide the breast side from a flat image; leaving it as is", stacklevel=2)
        return False
    return by_image


class OrientBreastd(MapTransform):
    """Reverse columns where needed so that the chest wall is at column 0 for all ``keys``.

    The decision is made once on ``data[ref_key]`` (laterality tag ``R`` -> flip, ``L`` -> keep,
    unknown -> compare the breast mass in the two column halves) and applied to every key.
    ``flip_lr`` is stored in the meta data of every key (values that are not MetaTensors become
    MetaTensors carrying the reference meta), and the affine is updated.

    Args:
        keys: keys to flip (image, labels, masks), ``(C, H, W)`` each.
        ref_key: the image that decides.
        method: ``"laterality"`` or ``"intensity"`` (see :func:`chest_wall_on_right`).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "image",
        method: str = "laterality",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if method not in ("laterality", "intensity"):
            raise ValueError(f"method must be 'laterality' or 'intensity', got {method!r}")
        self.ref_key = ref_key
        self.method = method

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Flip the keys (or not) and record ``flip_lr``."""
        d = dict(data)
        ref = d[self.ref_key]
        ref_meta = _meta_of(ref)
        flip = chest_wall_on_right(ref, ref_meta.get("laterality", "U"), self.method, path=_path_of(ref_meta) or None)
        for key in self.key_iterator(d):
            x = d[key]
            meta = _meta_of(x) or dict(ref_meta)
            t = _as_tensor(x)
            affine = x.affine if isinstance(x, MetaTensor) else meta.get("affine")
            if flip:
                t = torch.flip(t, dims=(-1,))
                w = t.shape[-1]
                affine = _affine_with(affine, np.array([[1.0, 0, 0], [0, -1.0, w - 1.0], [0, 0, 1.0]]))
            meta["flip_lr"] = bool(flip)
            d[key] = _meta_tensor(t, affine, meta)
        return d


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------


def _resize(t: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool) -> torch.Tensor:
    """Resize a ``(C, H, W)`` tensor with ``torch.nn.functional.interpolate`` (pixel-centre convention)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    dtype = t.dtype
    m = "nearest-exact" if mode == "nearest" else mode
    x = t.float()[None]
    kwargs: dict[str, Any] = {}
    if m in ("bilinear", "bicubic"):
        down = size[0] < t.shape[-2] or size[1] < t.shape[-1]
        kwargs = {"align_corners": False, "antialias": bool(antialias and down)}
    y = F.interpolate(x, size=size, mode=m, **kwargs)[0]
    if m.startswith("nearest") and not dtype.is_floating_point:
        return y.to(dtype)
    if dtype.is_floating_point:
        return y.to(dtype)
    return y


def _scale_matrix(src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Index transform dst -> src for pixel-centre (align_corners=False) resizing."""
    sr, sc = src[0] / dst[0], src[1] / dst[1]
    return np.array([[sr, 0, 0.5 * sr - 0.5], [0, sc, 0.5 * sc - 0.5], [0, 0, 1.0]])


class ResampleToSpacingd(MapTransform):
    """Resample ``(C, H, W)`` arrays to an isotropic working pixel spacing (mm).

    The current pixel spacing is derived from ``data[ref_key]``'s meta data
    (``spacing`` scaled by ``original_shape`` / current shape). All keys are resampled to the same
    grid with ``torch.nn.functional.interpolate`` (``align_corners=False``; ``"nearest"`` means
    ``"nearest-exact"``). Records ``working_spacing`` and ``working_shape``; nothing is resampled
    when both spacings are within ``tolerance`` of the target.

    Args:
        keys: keys to resample.
        spacing: working spacing in mm.
        mode: interpolation mode, one or one per key (``"bilinear"`` for images, ``"nearest"`` for masks).
        ref_key: key whose meta gives the source spacing and shape.
        antialias: low-pass filter when down-sampling with bilinear/bicubic.
        tolerance: relative spacing difference below which nothing is done.
        max_zoom: refuse (MammogramError) to scale by more than this factor, or by less than its
            inverse: such factors mean the spacing is wrong (e.g. a PNG read at 1 mm).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing: float = 0.07,
        mode: str | Sequence[str] = "bilinear",
        ref_key: str = "image",
        antialias: bool = True,
        tolerance: float = 0.01,
        max_zoom: float = 8.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not spacing > 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        self.spacing = float(spacing)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.ref_key = ref_key
        self.antialias = antialias
        self.tolerance = float(tolerance)
        self.max_zoom = float(max_zoom)

    def _target(self, d: Mapping) -> tuple[tuple[int, int], tuple[int, int], dict]:
        ref = d[self.ref_key]
        meta = _meta_of(ref)
        shape = tuple(int(s) for s in ref.shape[-2:])
        sp = _spacing_pair(meta.get("spacing"))
        if sp is None:
            raise MammogramError(_path_of(meta), "no `spacing` in the meta data; load with LoadMammogramd")
        orig = meta.get("original_shape", shape)
        cur = (sp[0] * orig[0] / shape[0], sp[1] * orig[1] / shape[1])
        if all(abs(c - self.spacing) <= self.tolerance * self.spacing for c in cur):
            return shape, shape, meta
        zoom = max(cur[0], cur[1]) / self.spacing, min(cur[0], cur[1]) / self.spacing
        if zoom[0] > self.max_zoom or zoom[1] < 1.0 / self.max_zoom:
            raise MammogramError(
                _path_of(meta),
                f"resampling from {cur[0]:.4g}x{cur[1]:.4g} mm to {self.spacing} mm pixels would scale the image by "
                f"{zoom[0]:.3g}x; the pixel spacing looks wrong, give the right one with --pixel_spacing (mm)",
            )
        size = (max(1, round(shape[0] * cur[0] / self.spacing)), max(1, round(shape[1] * cur[1] / self.spacing)))
        return shape, size, meta

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample all keys to the working grid."""
        d = dict(data)
        shape, size, ref_meta = self._target(d)
        for key, mode in self.key_iterator(d, self.mode):
            x = d[key]
            t = _as_tensor(x)
            if tuple(t.shape[-2:]) != shape:
                raise ValueError(
                    f"data[{key!r}] has spatial shape {tuple(t.shape[-2:])}, reference {self.ref_key!r} has {shape}"
                )
            meta = _meta_of(x) or dict(ref_meta)
            affine = x.affine if isinstance(x, MetaTensor) else ref_meta.get("affine")
            if size != shape:
                t = _resize(t, size, mode, self.antialias)
                affine = _affine_with(affine, _scale_matrix(shape, size))
            meta["working_spacing"] = self.spacing
            meta["working_shape"] = (int(size[0]), int(size[1]))
            d[key] = _meta_tensor(t, affine, meta)
        return d


# ----------------------------------------------------------------------------------------------
# breast mask
# ----------------------------------------------------------------------------------------------


def _fill_holes_chest_wall(mask: np.ndarray) -> np.ndarray:
    """Fill holes, treating the chest-wall column (0) as closed so dark tissue there is filled."""
    padded = np.pad(mask, ((0, 0), (1, 0)), constant_values=True)
    return ndimage.binary_fill_holes(padded)[:, 1:]


def _pectoral_muscle(small: np.ndarray, breast: np.ndarray, margin: int) -> np.ndarray | None:
    """Pectoral muscle (top of the chest-wall side in MLO views) as a straight-edged region, or None."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    rows = np.flatnonzero(breast.any(axis=1))
    if rows.size < 8:
        return None
    r0, r1 = int(rows[0]), int(rows[-1])
    extent = r1 - r0 + 1
    width = int(np.flatnonzero(breast.any(axis=0))[-1]) + 1
    roi = np.zeros_like(breast)
    roi[r0 : r0 + int(0.7 * extent), : max(2, int(0.7 * width))] = True
    roi &= breast
    vals = small[roi]
    if vals.size < 32 or not vals.max() > vals.min():
        return None
    t = threshold_otsu(vals)
    cand = ndimage.binary_opening((small > t) & roi, structure=disk(1))
    # Width of the bright run that starts at the chest wall, row by row from the top. The muscle is
    # a triangle whose width shrinks downwards; where dense tissue joins the run it grows again, so
    # only rows at the running minimum are used to fit the muscle edge.
    rr, widths = [], []
    running = np.inf
    for r in range(r0, r0 + int(0.7 * extent)):
        row = cand[r]
        if not row[:margin].any():
            if rr:
                break
            continue
        start = int(np.flatnonzero(row[:margin])[0])
        stop = np.flatnonzero(~row[start:])
        width_r = int(stop[0]) + start if stop.size else row.size
        if width_r <= running:
            running = width_r
            rr.append(r)
            widths.append(width_r)
    if len(rr) < 4:
        return None
    rr_a, w_a = np.asarray(rr, float), np.asarray(widths, float)
    slope, intercept = np.polyfit(rr_a, w_a, 1)
    resid = np.abs(w_a - (slope * rr_a + intercept))
    keep = resid <= max(2.0, 2.5 * float(np.median(resid)))
    if keep.sum() >= 4:
        slope, intercept = np.polyfit(rr_a[keep], w_a[keep], 1)
    if slope >= 0:  # the muscle edge must run from the top towards the chest wall
        return None
    r_idx, c_idx = np.mgrid[0 : small.shape[0], 0 : small.shape[1]]
    muscle = (c_idx <= slope * r_idx + intercept) & breast & (r_idx >= r0)
    frac = muscle.sum() / max(1, breast.sum())
    if not 0.005 < frac < 0.5:
        return None
    return muscle


def _disk_opening(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological opening by a disk of ``radius`` pixels via Euclidean distance transforms.

    Exact for disks and linear in the image size, unlike a large structuring element.

    Args:
        mask: boolean image.
        radius: disk radius in pixels.
    """
    if radius <= 0 or not mask.any():
        return mask.copy()
    padded = np.pad(mask, 1, constant_values=False)
    eroded = ndimage.distance_transform_edt(padded) > radius
    if not eroded.any():
        return np.zeros_like(mask)
    opened = ndimage.distance_transform_edt(~eroded) <= radius
    return opened[1:-1, 1:-1] & mask


def compute_breast_mask(
    image: np.ndarray | torch.Tensor,
    spacing: float = 0.07,
    exclude_pectoral: bool = False,
    opening_mm: float = 2.0,
    low_fraction: float = 0.3,
    max_side: int = 1024,
) -> tuple[np.ndarray, bool]:
    """Breast mask of an oriented mammogram (chest wall at column 0, bright = dense).

    Works on a block-mean copy whose longer side is at most ``max_side``: Otsu threshold of the
    robustly clipped image with hysteresis down to ``bg + low_fraction * (otsu - bg)``, hole
    filling, morphological opening, then the largest connected component touching the chest-wall
    side is kept (burned-in text, skin markers and other detached blobs are dropped); falls back to
    the largest component with a warning when none touches column 0.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` image.
        spacing: pixel spacing in mm (sets the opening radius).
        exclude_pectoral: remove the pectoral muscle (top of the chest-wall side).
        opening_mm: radius of the opening in mm.
        low_fraction: hysteresis low threshold as a fraction between background and Otsu level.
        max_side: longer side of the working copy.

    Returns:
        (bool mask ``(H, W)``, whether a pectoral muscle was removed).
    """
    from skimage.filters import apply_hysteresis_threshold
    from skimage.morphology import disk

    arr = _as_tensor(image).detach().cpu().float().numpy()
    arr = arr.reshape(arr.shape[-2:])
    h, w = arr.shape
    small, f = _downsample(arr, max_side)
    fg = _foreground(small)
    if fg is None:
        return np.zeros((h, w), bool), False
    _, t_high, bg = fg
    lo, hi = np.percentile(small, [0.5, 99.5])
    clipped = np.clip(small, lo, hi)
    t_low = bg + low_fraction * (t_high - bg)
    mask = apply_hysteresis_threshold(clipped, t_low, t_high)
    mask = _fill_holes_chest_wall(mask)
    radius = max(1, round(opening_mm / (spacing * f)))
    radius = min(radius, max(1, min(small.shape) // 16))
    mask = _disk_opening(mask, radius)
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros((h, w), bool), False
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    margin = max(2, round(0.02 * small.shape[1]))
    touching = np.unique(lab[:, :margin])
    touching = touching[touching > 0]
    if touching.size:
        keep = int(touching[np.argmax(sizes[touching])])
    else:
        warnings.warn("no tissue touches the chest-wall side (column 0); keeping the largest region", stacklevel=2)
        keep = int(sizes.argmax())
    mask = _fill_holes_chest_wall(lab == keep)
    removed = False
    if exclude_pectoral:
        muscle = _pectoral_muscle(clipped, mask, margin)
        if muscle is not None:
            mask = mask & ~muscle
            lab, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(lab.ravel())
                sizes[0] = 0
                mask = lab == int(sizes.argmax())
            removed = True
        else:
            warnings.warn("pectoral muscle not found; breast mask left as is", stacklevel=2)
    if f > 1:
        up = F.interpolate(
            torch.from_numpy(mask.astype(np.float32))[None, None],
            size=(small.shape[0] * f, small.shape[1] * f),
            mode="bilinear",
            align_corners=False,
        )[0, 0, :h, :w]
        mask = (up > 0.5).numpy()
    return mask, removed


def large_scale_structure(image: np.ndarray | torch.Tensor, max_side: int = 512) -> float:
    """Share of an image's variance that lies in large-scale structure (0: pure noise, 1: smooth).

    The image is block-averaged to at most ``max_side`` pixels per side and smoothed by a Gaussian
    of 1/64 of that side; the ratio of the smoothed image's variance to the variance before
    smoothing is returned. A breast against its background, or dense tissue filling a spot view,
    keeps most of its variance (phantoms: 0.5 to 0.85); uncorrelated noise keeps about
    ``1 / (4 pi sigma^2)``, i.e. 0.001.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` image.
        max_side: longer side of the working copy.
    """
    arr = _as_tensor(image).detach().cpu().float().numpy()
    arr = arr.reshape(arr.shape[-2:])
    small, _ = _downsample(arr, max_side)
    small = small.astype(np.float64)
    total = float(small.var())
    if not np.isfinite(total) or total <= 0:
        return 0.0
    smooth = ndimage.gaussian_filter(small, sigma=max(small.shape) / 64.0, mode="nearest")
    return float(smooth.var() / total)


class BreastMaskd(MapTransform):
    """Compute the breast mask of ``data[image_key]`` into ``data[out_key]`` (``(1, H, W)`` uint8).

    Expects the chest wall at column 0 (run :class:`OrientBreastd` first). See
    :func:`compute_breast_mask` for the method. The mask carries the image's meta data plus
    ``pectoral_removed``.

    Args:
        image_key: image key.
        out_key: output key.
        exclude_pectoral: remove the pectoral muscle in views listed in ``pectoral_views``.
        pectoral_views: views in which the muscle is visible.
        min_area_fraction: smaller masks (fraction of the image) raise ``MammogramError("empty breast mask")``.
        opening_mm: radius of the morphological opening in mm.
        dtype: output dtype.
        min_structure: images whose :func:`large_scale_structure` is below this raise
            ``MammogramError("no breast found ...")``: noise has about 0.001, mammograms 0.3 and more.
    """

    def __init__(
        self,
        image_key: str = "image",
        out_key: str = "breast",
        exclude_pectoral: bool = False,
        pectoral_views: Sequence[str] = ("MLO", "ML", "LMO", "LM", "SIO"),
        min_area_fraction: float = 0.01,
        opening_mm: float = 2.0,
        dtype: torch.dtype = torch.uint8,
        min_structure: float = 0.02,
    ) -> None:
        super().__init__(image_key, allow_missing_keys=False)
        self.image_key = image_key
        self.out_key = out_key
        self.exclude_pectoral = exclude_pectoral
        self.pectoral_views = tuple(v.upper() for v in pectoral_views)
        self.min_area_fraction = float(min_area_fraction)
        self.opening_mm = float(opening_mm)
        self.dtype = dtype
        self.min_structure = float(min_structure)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the breast mask."""
        d = dict(data)
        img = d[self.image_key]
        meta = _meta_of(img)
        path = _path_of(meta)
        t = _as_tensor(img)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MammogramError(path, "image contains NaN/inf")
        check_grey_levels(meta)
        sp = meta.get("working_spacing") or min(_spacing_pair(meta.get("spacing")) or (0.07, 0.07))
        pect = self.exclude_pectoral and str(meta.get("view", "")).upper() in self.pectoral_views
        structure = large_scale_structure(t[0])
        if structure < self.min_structure and float(t.max()) > float(t.min()):  # flat: "empty breast mask" below
            raise MammogramError(
                path, f"no breast found: the image has no large-scale structure ({100 * structure:.2f} % of its "
                "variance; noise?); a mammogram is expected",
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask, removed = compute_breast_mask(t[0], float(sp), exclude_pectoral=pect, opening_mm=self.opening_mm)
        for w in caught:  # name the file in the mask's warnings
            msg = str(w.message)
            warnings.warn(msg if not path or msg.startswith(path) else f"{path}: {msg}", w.category, stacklevel=2)
        if mask.sum() < self.min_area_fraction * mask.size:
            raise MammogramError(path, "empty breast mask (no breast found)")
        meta["pectoral_removed"] = bool(removed)
        affine = img.affine if isinstance(img, MetaTensor) else None
        out = torch.from_numpy(mask[None].astype(np.uint8)).to(self.dtype)
        d[self.out_key] = _meta_tensor(out, affine, meta)
        return d


# ----------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------


class NormalizeMammogramd(MapTransform):
    """Map breast intensity percentiles ``lower`` -> 0 and ``upper`` -> 1 (linear, not clipped).

    Records ``norm_lower``/``norm_upper`` (the raw values mapped to 0 and 1) in the meta data so the
    raw scale can be recovered as ``x * (upper - lower) + lower``.

    Args:
        keys: image keys.
        breast_key: breast mask key; ``None`` uses the whole image.
        lower: lower percentile (0-100).
        upper: upper percentile (0-100).
        nan_policy: ``"raise"`` -> ``MammogramError("image contains NaN/inf")``; ``"fill"`` ->
            replace NaN/-inf by the minimum and +inf by the maximum finite value, with a warning.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        breast_key: str | None = "breast",
        lower: float = 1.0,
        upper: float = 99.0,
        nan_policy: str = "raise",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.breast_key = breast_key
        self.lower = float(lower)
        self.upper = float(upper)
        self.nan_policy = _check_nan_policy(nan_policy)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise the keys."""
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            meta = _meta_of(x)
            path = _path_of(meta) or str(key)
            arr = _as_tensor(x).detach().cpu().float().numpy()
            arr = _handle_non_finite(arr, path, self.nan_policy)
            if self.breast_key is None:
                sel = np.ones(arr.shape, bool)
            else:
                b = _as_tensor(d[self.breast_key]).detach().cpu().numpy() > 0
                if b.shape[-2:] != arr.shape[-2:]:
                    raise ValueError(f"breast mask shape {b.shape} does not match image shape {arr.shape}")
                sel = np.broadcast_to(b, arr.shape)
            vals = arr[sel]
            if vals.size == 0:
                raise MammogramError(path, "empty breast mask")
            step = max(1, vals.size // 4_000_000)
            lo, hi = (float(v) for v in np.percentile(vals[::step], [self.lower, self.upper]))
            if not hi - lo > 1e-6 * max(1.0, abs(hi)):
                raise MammogramError(path, "no contrast inside the breast (flat image)")
            out = ((arr - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
            meta.update({"norm_lower": lo, "norm_upper": hi, "norm_percentiles": (self.lower, self.upper)})
            affine = x.affine if isinstance(x, MetaTensor) else None
            d[key] = _meta_tensor(torch.from_numpy(out), affine, meta)
        return d


# ----------------------------------------------------------------------------------------------
# back to the source grid
# ----------------------------------------------------------------------------------------------


class RestoreGeometryd(MapTransform):
    """Bring working-grid maps back onto the source pixel grid (inverse of resample + flip).

    Each key holds a ``(C, h, w)`` (or ``(h, w)``) map on the working grid of
    ``data[ref_meta_key]``; it is resized to ``original_shape`` and its columns are reversed back
    when ``flip_lr`` is set. Outputs are MetaTensors with the reference meta data and the source
    affine, dtype kept (nearest) or float (bilinear on integers).

    Args:
        keys: maps to restore (probabilities, masks).
        ref_meta_key: key of the preprocessed image (a MetaTensor) or of its meta dict.
        mode: interpolation, one or one per key: ``"bilinear"`` for probabilities, ``"nearest"`` for masks.
        antialias: low-pass filter when down-sampling bilinear maps (off by default so that
            small bright spots keep their peak value).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_meta_key: str = "image",
        mode: str | Sequence[str] = "bilinear",
        antialias: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_meta_key = ref_meta_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.antialias = antialias

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Restore the keys."""
        d = dict(data)
        ref_meta = _ref_meta(d, self.ref_meta_key)
        if "original_shape" not in ref_meta:
            raise KeyError(f"meta data of {self.ref_meta_key!r} has no 'original_shape'")
        target = tuple(int(s) for s in ref_meta["original_shape"])
        flip = bool(ref_meta.get("flip_lr", False))
        orig_affine = ref_meta.get("original_affine")
        for key, mode in self.key_iterator(d, self.mode):
            t = _as_tensor(d[key])
            squeeze = t.ndim == 2
            if squeeze:
                t = t[None]
            if t.ndim != 3:
                raise ValueError(f"data[{key!r}] must be (C, H, W) or (H, W), got shape {tuple(t.shape)}")
            t = _resize(t, target, mode, self.antialias)
            if flip:
                t = torch.flip(t, dims=(-1,))
            meta = dict(ref_meta)
            # the output lies on the source grid: a second restore is a no-op
            meta["restored_flip_lr"] = flip
            meta["restored_from_shape"] = tuple(int(s) for s in ref_meta.get("working_shape", target))
            meta["flip_lr"] = False
            meta["working_shape"] = target
            meta["restored"] = True
            affine = torch.as_tensor(orig_affine, dtype=torch.float64) if orig_affine is not None else None
            out = _meta_tensor(t, affine, meta)
            d[key] = out[0] if squeeze else out
        return d


# ----------------------------------------------------------------------------------------------
# INbreast labels
# ----------------------------------------------------------------------------------------------

_POINT_RE = re.compile(r"\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)")


def _parse_point(text: Any) -> tuple[float, float]:
    """``"(x, y)"`` -> (x, y) floats (x = column, y = row)."""
    m = _POINT_RE.search(str(text))
    if m is None:
        raise ValueError(f"not a point: {text!r}")
    return float(m.group(1)), float(m.group(2))


def _draw_roi(mask: np.ndarray, points: list[tuple[float, float]], point_radius: int) -> None:
    """Draw one ROI (x, y points) into ``mask`` in place: point/disc, line or filled polygon."""
    from skimage.draw import disk, line, polygon, polygon_perimeter

    h, w = mask.shape
    if not points:
        return
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    ri, ci = np.rint(ys).astype(int), np.rint(xs).astype(int)
    if len(points) == 1:
        if point_radius > 0:
            rr, cc = disk((ri[0], ci[0]), point_radius + 0.5, shape=(h, w))
            mask[rr, cc] = 1
        elif 0 <= ri[0] < h and 0 <= ci[0] < w:
            mask[ri[0], ci[0]] = 1
        return
    if len(points) == 2:
        rr, cc = line(ri[0], ci[0], ri[1], ci[1])
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        mask[rr[ok], cc[ok]] = 1
        return
    rr, cc = polygon(ys, xs, shape=(h, w))
    mask[rr, cc] = 1
    rr, cc = polygon_perimeter(ri, ci, shape=(h, w), clip=False)
    mask[rr, cc] = 1


def read_inbreast_xml(
    xml_path: PathLike,
    shape: Sequence[int],
    point_radius: int = 0,
    calc_names: Sequence[str] = ("Calcification", "Calcifications"),
    cluster_names: Sequence[str] = ("Cluster",),
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise an INbreast (OsiriX plist) annotation file.

    ROIs are read from ``Images[0].ROIs``; each has a ``Name`` and ``Point_px`` strings
    ``"(x, y)"`` with x = column, y = row (rounded to the nearest pixel). One point -> one pixel
    (or a disc of ``point_radius``), two points -> a line, three or more -> a filled polygon
    (with its outline). Names are matched case-insensitively; other ROIs (Mass, ...) are ignored.

    Args:
        xml_path: the ``.xml`` file.
        shape: (H, W) of the image.
        point_radius: radius in pixels of the disc drawn for single-point ROIs (0: one pixel).
        calc_names: ROI names that are calcifications.
        cluster_names: ROI names that are calcification clusters.

    Returns:
        (calcification mask, cluster mask), both ``uint8`` 0/1 of shape ``shape``.

    Raises:
        MammogramError: when the file is missing or not an OsiriX plist.
    """
    h, w = int(shape[-2]), int(shape[-1])
    calc = np.zeros((h, w), np.uint8)
    cluster = np.zeros((h, w), np.uint8)
    p = Path(xml_path)
    if not p.is_file():
        raise MammogramError(xml_path, "annotation file not found")
    try:
        with open(p, "rb") as f:
            plist = plistlib.load(f)
    except Exception as e:
        raise MammogramError(xml_path, f"cannot parse OsiriX/INbreast XML ({type(e).__name__}: {e})") from e
    images = plist.get("Images") if isinstance(plist, dict) else None
    if not isinstance(images, list) or not images:
        raise MammogramError(xml_path, "no 'Images' list in the INbreast XML")
    rois = images[0].get("ROIs", []) if isinstance(images[0], dict) else []
    calc_set = {n.strip().lower() for n in calc_names}
    cluster_set = {n.strip().lower() for n in cluster_names}
    for i, roi in enumerate(rois):
        name = str(roi.get("Name", "")).strip().lower()
        if name not in calc_set and name not in cluster_set:
            continue
        try:
            points = [_parse_point(s) for s in roi.get("Point_px", [])]
        except ValueError as e:
            raise MammogramError(xml_path, f"ROI {i} ({roi.get('Name')}): {e}") from e
        _draw_roi(calc if name in calc_set else cluster, points, point_radius)
    return calc, cluster


class LoadINbreastLabeld(MapTransform):
    """Load labels aligned with ``data[image_key]``: INbreast XML, or a mask image file.

    ``data[key]`` is a path to an OsiriX/INbreast ``.xml`` (rasterised by :func:`read_inbreast_xml`),
    a mask image in any format :class:`LoadMammogramd` reads (values > 0 are foreground), or
    ``None`` (an image without findings: all-zero mask). Must run right after loading the image,
    before :class:`OrientBreastd` / :class:`ResampleToSpacingd`, so that both share the source grid;
    the label then carries the image's meta data (plus ``label_file``) and follows the image
    through the geometry transforms.

    Args:
        keys: label keys (paths).
        image_key: the loaded image.
        point_radius: disc radius for single-point calcifications.
        calc_names: ROI names that are calcifications.
        cluster_names: ROI names that are clusters.
        cluster_key: where to put the cluster mask (``None``: not stored).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        point_radius: int = 0,
        calc_names: Sequence[str] = ("Calcification", "Calcifications"),
        cluster_names: Sequence[str] = ("Cluster",),
        cluster_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.point_radius = int(point_radius)
        self.calc_names = tuple(calc_names)
        self.cluster_names = tuple(cluster_names)
        self.cluster_key = cluster_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace label paths by ``(1, H, W)`` uint8 masks."""
        d = dict(data)
        img = d[self.image_key]
        meta = _meta_of(img)
        shape = tuple(int(s) for s in img.shape[-2:])
        if meta.get("flip_lr") or "working_shape" in meta or tuple(meta.get("original_shape", shape)) != shape:
            raise ValueError("LoadINbreastLabeld must run before OrientBreastd/ResampleToSpacingd (source grid)")
        affine = img.affine if isinstance(img, MetaTensor) else None
        for key in self.key_iterator(d):
            src = d[key]
            cluster = np.zeros(shape, np.uint8)
            if src is None:
                calc = np.zeros(shape, np.uint8)
            elif str(src).lower().endswith(".xml"):
                calc, cluster = read_inbreast_xml(
                    src, shape, self.point_radius, self.calc_names, self.cluster_names
                )
            else:
                arr, _ = _read_pixels(src, allowed_modalities=None, min_size=1)
                if arr.shape != shape:
                    raise MammogramError(src, f"label shape {arr.shape} does not match the image shape {shape}")
                calc = (np.nan_to_num(arr.astype(np.float32)) > 0).astype(np.uint8)
            lmeta = dict(meta, label_file="" if src is None else str(src))
            d[key] = _meta_tensor(torch.from_numpy(calc)[None], affine, lmeta)
            if self.cluster_key is not None:
                d[self.cluster_key] = _meta_tensor(torch.from_numpy(cluster)[None], affine, dict(lmeta))
        return d


# ----------------------------------------------------------------------------------------------
# data lists
# ----------------------------------------------------------------------------------------------


def load_datalist(path: PathLike, section: str = "test", base_dir: PathLike | None = None) -> list[dict]:
    """Read a MONAI (decathlon-style) datalist JSON section.

    Relative ``image``/``label`` paths are joined to ``base_dir`` (default: the JSON's folder);
    a ``"label": null`` entry stays ``None`` (an image without findings).

    Args:
        path: datalist JSON file.
        section: list to read (``"training"``, ``"validation"``, ``"test"``, ...).
        base_dir: base folder for relative paths.
    """
    from monai.data import load_decathlon_datalist

    with open(path) as f:
        content = json.load(f)
    if section in content and not content[section]:
        return []
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=section, base_dir=base_dir)


def list_images(folder: PathLike, recursive: bool = False) -> list[dict]:
    """List the files of a folder for inference, images and non-images alike, sorted by path.

    Args:
        folder: the folder.
        recursive: descend into sub-folders.

    Returns:
        ``[{"image": path, "stem": stem, "format": fmt}, ...]`` where ``fmt`` is ``"dicom"``,
        ``"png"``, ``"tiff"``, ``"nifti"``, ``"mha"``, ``"sidecar"`` (pixel file of an ``.mhd``:
        skip it) or ``"unknown"`` (not an image: report it). Hidden files are skipped.

    Raises:
        MammogramError: when ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MammogramError(folder, "input folder not found")
    files = root.rglob("*") if recursive else root.iterdir()
    out = []
    for p in sorted(files):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        out.append({"image": str(p), "stem": file_stem(p), "format": image_format(p)})
    return out


# ----------------------------------------------------------------------------------------------
# atomic writers
# ----------------------------------------------------------------------------------------------


def _refuse_inputs(path: Path, protect: Iterable[PathLike]) -> None:
    target = os.path.realpath(path)
    for p in protect or ():
        if p is None:
            continue
        if os.path.realpath(p) == target or (path.exists() and Path(p).exists() and os.path.samefile(p, path)):
            raise MammogramError(path, "refusing to overwrite an input file")


def _atomic_write(path: Path, suffix: str, write: Any) -> None:
    """Call ``write(tmp)`` on a fresh temporary name next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"  # created by the writer: umask applies
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def save_nifti_atomic(
    array2d: np.ndarray | torch.Tensor,
    path: PathLike,
    spacing: Sequence[float] = (1.0, 1.0),
    protect: Iterable[PathLike] = (),
) -> None:
    """Write a 2-D ``(H, W)`` array to NIfTI as-is (``data[r, c]``), atomically.

    The affine is ``diag(row spacing, col spacing, 1, 1)``. The file is written to a temporary name
    in the same folder and renamed with ``os.replace``; parent folders are created.

    Args:
        array2d: ``(H, W)`` array (a ``(1, H, W)`` array is squeezed). bool is stored as uint8,
            int64 as int32.
        path: ``.nii`` or ``.nii.gz`` destination.
        spacing: (row, col) pixel spacing in mm.
        protect: paths that must never be overwritten (the inputs).

    Raises:
        MammogramError: when ``path`` is one of ``protect``.
        ValueError: for a wrong shape or file name.
    """
    import nibabel as nib

    arr = _as_tensor(array2d).detach().cpu().numpy() if isinstance(array2d, torch.Tensor) else np.asarray(array2d)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"save_nifti_atomic expects a 2-D (H, W) array, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    p = Path(path)
    low = p.name.lower()
    suffix = ".nii.gz" if low.endswith(".nii.gz") else ".nii" if low.endswith(".nii") else None
    if suffix is None:
        raise ValueError(f"NIfTI file name must end with .nii or .nii.gz: {path}")
    _refuse_inputs(p, protect)
    sp = _spacing_pair(spacing)
    if sp is None:
        raise ValueError(f"invalid spacing {spacing!r}")
    img = nib.Nifti1Image(np.ascontiguousarray(arr), np.diag([sp[0], sp[1], 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    _atomic_write(p, suffix, lambda tmp: nib.save(img, tmp))


def save_png_atomic(
    array: np.ndarray | torch.Tensor,
    path: PathLike,
    protect: Iterable[PathLike] = (),
) -> None:
    """Write a uint8 grey ``(H, W)`` or colour ``(H, W, 3|4)`` array to PNG atomically.

    Args:
        array: uint8 array.
        path: destination ``.png``.
        protect: paths that must never be overwritten (the inputs).

    Raises:
        MammogramError: when ``path`` is one of ``protect``.
        ValueError: for a wrong dtype or shape.
    """
    from PIL import Image

    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png_atomic expects uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"save_png_atomic expects (H, W) or (H, W, 3|4), got {arr.shape}")
    p = Path(path)
    _refuse_inputs(p, protect)
    im = Image.fromarray(np.ascontiguousarray(arr))
    _atomic_write(p, ".png", lambda tmp: im.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------------
# the preprocessing chain used by the configs
# ----------------------------------------------------------------------------------------------


def mammogram_preprocessing(
    spacing_override: float | Sequence[float] | None = None,
    working_spacing: float = 0.07,
    image_key: str = "image",
    label_key: str | None = None,
    breast_key: str = "breast",
    apply_voi: bool = False,
    allowed_modalities: Sequence[str] | None = ("MG",),
    min_size: int = 64,
    orient_method: str = "laterality",
    exclude_pectoral: bool = False,
    lower: float = 1.0,
    upper: float = 99.0,
    nan_policy: str = "raise",
    point_radius: int = 0,
) -> Compose:
    """Load -> (label) -> Orient -> Resample -> BreastMask -> Normalize -> EnsureTyped.

    Args:
        spacing_override: pixel spacing in mm that wins over the files' (needed for PNG/TIFF).
        working_spacing: working pixel spacing in mm.
        image_key: image key (a file path before, a MetaTensor after).
        label_key: optional label key (INbreast XML, mask file or None), resampled by nearest.
        breast_key: key for the breast mask.
        apply_voi: apply the DICOM VOI LUT / window.
        allowed_modalities: accepted DICOM modalities.
        min_size: minimum pixels per side.
        orient_method: ``"laterality"`` or ``"intensity"``.
        exclude_pectoral: remove the pectoral muscle from the breast mask in MLO views.
        lower: lower breast percentile mapped to 0.
        upper: upper breast percentile mapped to 1.
        nan_policy: ``"raise"`` or ``"fill"``.
        point_radius: disc radius for single-point INbreast calcifications.
    """
    geo_keys = [image_key] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    transforms: list[Any] = [
        LoadMammogramd(
            image_key,
            spacing=spacing_override,
            apply_voi=apply_voi,
            allowed_modalities=allowed_modalities,
            min_size=min_size,
            nan_policy=nan_policy,
        )
    ]
    if label_key:
        transforms.append(LoadINbreastLabeld(label_key, image_key=image_key, point_radius=point_radius))
    transforms += [
        OrientBreastd(geo_keys, ref_key=image_key, method=orient_method),
        ResampleToSpacingd(geo_keys, spacing=working_spacing, mode=modes, ref_key=image_key),
        BreastMaskd(image_key, out_key=breast_key, exclude_pectoral=exclude_pectoral),
        NormalizeMammogramd(image_key, breast_key=breast_key, lower=lower, upper=upper, nan_policy=nan_policy),
        EnsureTyped(geo_keys + [breast_key], track_meta=True),
    ]
    return Compose(transforms)
