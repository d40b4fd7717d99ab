"""DICOM objects derived from a source image: float maps as Secondary Capture, atomic writing.

A float map on the source grid (a probability map, the virtual normal image) becomes a 16-bit
Secondary Capture image with a modality LUT (``value = stored * slope + intercept``), the source's
pixel spacing, laterality and patient orientation, its patient and study identifiers, and
references to the source. highdicom 0.28's Parametric Map cannot be built for mammograms (no
patient coordinates), hence Secondary Capture. Derived UIDs are deterministic (from the source
SOP Instance UID, the object kind and the model version), so a re-run replaces rather than
duplicates the objects in a PACS. Used by :class:`bundle.engine.MammogramInference` (the virtual
normal image of DICOM inputs) and by the MONAI Deploy application (``deploy.mcref_app``).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["derived_uid", "header_only", "make_map_sc", "write_dataset_atomic", "PROB_SCALE"]

# Probability p is stored as round(p * PROB_SCALE) with RescaleSlope 1 / PROB_SCALE (exact as a DS).
PROB_SCALE = 50000
_PROB_SLOPE = "0.00002"
# Type 2 patient/study attributes highdicom copies from the source; empty when the source lacks them.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_SERIES_NUMBERS = {"seg": 9101, "prob": 9102, "virtual_normal": 9103}


def derived_uid(source_sop_uid: str, kind: str, version: str) -> str:
    """A deterministic UID for an object derived from one source instance.

    Args:
        source_sop_uid: SOPInstanceUID of the source image.
        kind: what is derived ("seg", "seg-series", "prob", ...).
        version: the model/bundle version (a new version gives new UIDs).
    """
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["mcref", str(version), str(kind), str(source_sop_uid)]))


def header_only(ds: Any) -> Any:
    """A copy of a source instance without its pixel data, with empty type 2 attributes added.

    highdicom copies the patient and study attributes from the source; sources written without
    some of them (allowed for type 2 attributes in practice) would otherwise fail.

    Args:
        ds: the source pydicom Dataset.
    """
    from pydicom.dataset import Dataset

    hdr = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0:  # pixel data and friends
            continue
        hdr.add(copy.deepcopy(elem))
    if getattr(ds, "file_meta", None) is not None:
        hdr.file_meta = copy.deepcopy(ds.file_meta)
    for kw in _TYPE2_FROM_SOURCE:
        if kw not in hdr:
            setattr(hdr, kw, "")
    return hdr


def _source_spacing(source: Any) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = source.get(kw)
        if v is not None and len(v) >= 2:
            return float(v[0]), float(v[1])
    return None


def make_map_sc(
    source: Any,
    values: np.ndarray,
    kind: str,
    version: str,
    value_range: tuple[float, float] = (0.0, 1.0),
    description: str = "mcref microcalcification probability (research)",
    manufacturer: str = "mcref",
) -> Any:
    """A 16-bit Secondary Capture image holding a float map on the source grid.

    Values are clipped to ``value_range`` and stored as ``round((v - lo) * PROB_SCALE / (hi - lo))``
    with a modality LUT giving back ``v`` to within ``(hi - lo) / (2 * PROB_SCALE)``.

    Args:
        source: the source image (pydicom Dataset).
        values: (H, W) float map, ``values[r, c]`` belongs to ``pixel_array[r, c]``.
        kind: "prob" or "virtual_normal" (UIDs and series number).
        version: model/bundle version.
        value_range: (lo, hi) of the stored values.
        description: SeriesDescription.
        manufacturer: Manufacturer of the new object.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.valuerep import format_number_as_ds

    values = np.asarray(values, dtype=np.float64)
    rows, cols = int(source.Rows), int(source.Columns)
    if values.shape != (rows, cols):
        raise ValueError(f"map shape {values.shape} does not match the source image ({rows}, {cols})")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"invalid value_range {value_range}")
    v = np.clip(np.nan_to_num(values, nan=lo), lo, hi)
    stored = np.round((v - lo) * (PROB_SCALE / (hi - lo))).astype(np.uint16)
    sop = str(source.SOPInstanceUID)
    lat = str(source.get("ImageLaterality", "") or source.get("Laterality", "") or "").upper()
    orientation = source.get("PatientOrientation")
    orientation = tuple(str(o) for o in orientation) if orientation is not None and len(orientation) == 2 else None
    spacing = _source_spacing(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header_only(source),
        pixel_array=stored,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=16,
        coordinate_system="PATIENT" if orientation else None,
        series_instance_uid=derived_uid(sop, f"{kind}-series", version),
        series_number=_SERIES_NUMBERS.get(kind, 9199),
        sop_instance_uid=derived_uid(sop, kind, version),
        instance_number=1,
        manufacturer=manufacturer,
        pixel_spacing=spacing,
        laterality=lat if lat in ("L", "R") else None,
        patient_orientation=orientation,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    slope = (hi - lo) / PROB_SCALE
    sc.RescaleSlope = _PROB_SLOPE if (lo, hi) == (0.0, 1.0) else format_number_as_ds(slope)
    sc.RescaleIntercept = format_number_as_ds(lo) if lo != 0.0 else "0"
    sc.RescaleType = "US"
    sc.WindowCenter = format_number_as_ds((lo + hi) / 2.0)
    sc.WindowWidth = format_number_as_ds(hi - lo)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SeriesDescription = description
    sc.DerivationDescription = f"{description}; value = stored * RescaleSlope + RescaleIntercept"
    for kw in ("ViewPosition", "BodyPartExamined"):
        if kw in source:
            setattr(sc, kw, source.get(kw))
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.ReferencedImageSequence = [ref]
    sc.SourceImageSequence = [copy.deepcopy(ref)]
    return sc


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_dataset_atomic(ds: Any, path: str | os.PathLike) -> Path:
    """Write a DICOM dataset (Part 10 file) to a temporary name beside ``path`` and rename it.

    Args:
        ds: pydicom Dataset with file meta information.
        path: destination file.
    """
    from pydicom import dcmwrite

    p = Path(path)
    _atomic(p, lambda tmp: dcmwrite(tmp, ds, enforce_file_format=True))
    return p
