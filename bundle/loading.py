"""Loading transforms: mammograms as MetaTensors, INbreast/mask labels, data lists.

:func:`read_mammogram` / :class:`LoadMammogramd` turn a file (read by :mod:`bundle.readers`) into a
``(1, H, W)`` float32 MetaTensor with the project's meta data (``docs/architecture.md``);
:func:`check_grey_levels` refuses blank and binary images; :func:`read_inbreast_xml` /
:class:`LoadINbreastLabeld` rasterise INbreast (OsiriX) annotations or read mask files on the
image's grid; :func:`load_datalist` and :func:`list_images` say which files to process.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple, ensure_tuple_rep

from bundle.imagemeta import _meta_of, _meta_tensor, _path_of
from bundle.readers import (
    MammogramError,
    PathLike,
    _check_nan_policy,
    _handle_non_finite,
    _read_pixels,
    _spacing_pair,
    file_stem,
    image_format,
)

__all__ = [
    "check_grey_levels",
    "read_mammogram",
    "LoadMammogramd",
    "read_inbreast_xml",
    "LoadINbreastLabeld",
    "load_datalist",
    "list_images",
]


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
