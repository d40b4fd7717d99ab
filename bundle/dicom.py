"""DICOM objects derived from a source image: SEGs, float maps as Secondary Capture, atomic writing.

* :func:`make_seg` / :func:`make_fractional_seg`: the refined microcalcification mask as a BINARY
  DICOM Segmentation and the refined probability as a FRACTIONAL (probability) one, each a
  single frame on the source pixel grid, segment "Calcification of breast" with anatomic region
  breast and the image's laterality (highdicom).
* :func:`safe_name`: a file name made of safe characters from a UID (or any header string).

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
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from bundle.utils import atomic_path

__all__ = [
    "derived_uid",
    "header_only",
    "make_map_sc",
    "make_seg",
    "make_fractional_seg",
    "make_virtual_normal",
    "safe_name",
    "write_dataset_atomic",
    "PROB_SCALE",
    "FRACTIONAL_MAX",
    "ALGORITHM_NAME",
    "algorithm_name",
]

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
# FRACTIONAL SEG: probability p is stored as round(p * FRACTIONAL_MAX) (8 bits), so it reads back
# to within 0.5 / FRACTIONAL_MAX.
FRACTIONAL_MAX = 255
# The product: SegAI's map refined by the generative (virtual normal) step, "SegAI+R:GenAI".
ALGORITHM_NAME = "mcref SegAI+R:GenAI"


def algorithm_name(method: str | None) -> str:
    """The SEG algorithm name of a refinement method (config ``refiner_name``).

    Args:
        method: e.g. "segai+genai" (the default product, :data:`ALGORITHM_NAME`) or another
            registered refiner name; None or empty: the default.
    """
    m = str(method or "").strip()
    if not m or m.lower() == "segai+genai":
        return ALGORITHM_NAME
    return f"mcref {m}"[:64]
_SAFE_CHARS = re.compile(r"[^0-9A-Za-z._-]")


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


def _derived_ids(sop: str, kind: str, version: str, manufacturer: str) -> dict[str, Any]:
    """The series/instance identity of the derived object ``kind`` of the image ``sop`` (highdicom
    keyword arguments shared by the Secondary Capture and SEG objects)."""
    return {
        "series_instance_uid": derived_uid(sop, f"{kind}-series", version),
        "series_number": _SERIES_NUMBERS.get(kind, 9199),
        "sop_instance_uid": derived_uid(sop, kind, version),
        "instance_number": 1,
        "manufacturer": manufacturer,
    }


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
        **_derived_ids(sop, kind, version, manufacturer),
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


def safe_name(value: Any, max_len: int = 64) -> str:
    """A file or folder name made only of ``[0-9A-Za-z._-]`` from a header value (e.g. a UID).

    A well-formed UID comes back unchanged. Anything else (other characters, a leading dot, ``.``,
    ``..``, empty, longer than ``max_len``) is cleaned and gets a short hash of the original
    value, so two different values never share a name and the name is never ``.``, ``..`` nor
    hidden.

    Args:
        value: the header value (str() is applied; None counts as empty).
        max_len: the longest name kept without a hash.
    """
    text = "" if value is None else str(value)
    cleaned = _SAFE_CHARS.sub("_", text)[:max_len].lstrip(".")
    if cleaned and cleaned == text:
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned or 'unnamed'}-{digest}"


def _laterality(source: Any) -> str | None:
    """``"L"``/``"R"`` from ImageLaterality (or series Laterality) of the source, else None."""
    lat = str(source.get("ImageLaterality", "") or source.get("Laterality", "") or "").strip().upper()
    return lat if lat in ("L", "R") else None


def _segment_description(source: Any, label: str, version: str, algorithm: str = ALGORITHM_NAME) -> Any:
    """The one segment of the mcref SEGs: calcification of breast, anatomic region breast with
    the image's laterality as its modifier, found automatically by ``algorithm``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category = getattr(codes.SCT, "MorphologicallyAbnormalStructure", None) or codes.SCT.Tissue
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=codes.SCT.CalcificationOfBreast,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, version=str(version), family=codes.cid7162.ArtificialIntelligence
        ),
        anatomic_regions=[codes.SCT.Breast],
    )
    lat = _laterality(source)
    if lat is not None:  # laterality as the anatomic region's modifier (CID 244)
        modifier = hd.sr.CodedConcept.from_code(codes.SCT.Right if lat == "R" else codes.SCT.Left)
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [modifier]
    return description


def _segmentation(
    source: Any, frame: np.ndarray, kind: str, version: str, label: str, fractional: bool, manufacturer: str,
    algorithm: str = ALGORITHM_NAME,
) -> Any:
    import highdicom as hd

    sop = str(source.SOPInstanceUID)
    extra: dict[str, Any] = {}
    if fractional:
        extra = {"fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
                 "max_fractional_value": FRACTIONAL_MAX}
    seg = hd.seg.Segmentation(
        source_images=[header_only(source)],
        pixel_array=frame[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(source, label, version, algorithm)],
        **_derived_ids(sop, kind, version, manufacturer),
        manufacturer_model_name=algorithm,
        software_versions=str(version),
        device_serial_number="0",
        content_description=f"{label} (research use only)",
        content_label="MC_PROB" if fractional else "MC_SEG",
        omit_empty_frames=False,
        **extra,
    )
    _complete_pixel_measures(seg, source)
    lat = _laterality(source)
    if lat is not None:
        seg.Laterality = lat  # General Series: the breast (a paired structure) this SEG is of
    seg.BodyPartExamined = str(source.get("BodyPartExamined", "") or "BREAST")
    return seg


def _complete_pixel_measures(seg: Any, source: Any) -> None:
    """Make the shared Pixel Measures item of a single-frame SEG readable by highdicom.

    highdicom copies PixelSpacing of the source into a Pixel Measures item without SliceThickness
    (DICOM asks for it only with a Frame of Reference, which mammograms lack), but its reader
    (``segread``) then refuses the file. SliceThickness becomes the source's BodyPartThickness
    (compressed breast thickness, the depth a projection image covers) or SliceThickness; with
    neither, the item is dropped, as highdicom does for sources without PixelSpacing, and readers
    take the geometry from the referenced source image.
    """
    shared = seg.get("SharedFunctionalGroupsSequence")
    if not shared or "PixelMeasuresSequence" not in shared[0]:
        return
    item = shared[0].PixelMeasuresSequence[0]
    if "SliceThickness" in item:
        return
    for kw in ("BodyPartThickness", "SliceThickness"):
        try:
            value = float(source.get(kw) or 0.0)
        except (TypeError, ValueError):
            value = 0.0
        if np.isfinite(value) and value > 0:
            from pydicom.valuerep import format_number_as_ds

            item.SliceThickness = format_number_as_ds(value)
            return
    del shared[0].PixelMeasuresSequence


def make_seg(
    source: Any, mask: np.ndarray, version: str, kind: str = "seg", manufacturer: str = "mcref",
    algorithm: str = ALGORITHM_NAME,
) -> Any:
    """The refined microcalcification mask as a BINARY DICOM Segmentation of one source mammogram.

    One frame on the source pixel grid (``frame[r, c]`` belongs to ``pixel_array[r, c]``), segment
    "Microcalcification" (SCT 309587003 "Calcification of breast"), anatomic region breast (SCT
    76752008) with the image's laterality as modifier, General Series Laterality, algorithm
    ``algorithm`` (default :data:`ALGORITHM_NAME`), referencing the source image. Patient and study identifiers are the
    source's; series and instance UIDs are derived (:func:`derived_uid`).

    Args:
        source: the source image (pydicom Dataset; pixel data not needed).
        mask: (H, W) array, nonzero = microcalcification, on the source grid.
        version: bundle version (algorithm version, software version, UIDs).
        kind: object kind for UIDs and the series number.
        manufacturer: Manufacturer of the new object.
        algorithm: algorithm name (:func:`algorithm_name` of the refinement method).

    Returns:
        The highdicom ``Segmentation`` (a pydicom Dataset).

    Raises:
        ValueError: when ``mask`` is not on the source grid.
    """
    mask = np.asarray(mask)
    rows, cols = int(source.Rows), int(source.Columns)
    if mask.shape != (rows, cols):
        raise ValueError(f"mask shape {mask.shape} does not match the source image ({rows}, {cols})")
    seg = _segmentation(source, (mask > 0).astype(np.uint8), kind, version, "Microcalcification", False, manufacturer,
                        algorithm)
    seg.SeriesDescription = "mcref microcalcification SEG (refined; research)"
    return seg


def make_fractional_seg(
    source: Any, prob: np.ndarray, version: str, kind: str = "prob", manufacturer: str = "mcref",
    algorithm: str = ALGORITHM_NAME,
) -> Any:
    """The refined microcalcification probability as a FRACTIONAL (PROBABILITY) DICOM Segmentation.

    Same segment, geometry and identifiers as :func:`make_seg`; values in [0, 1] (NaN as 0) are
    stored as ``round(p * FRACTIONAL_MAX)``, so a viewer overlays them and a reader gets ``p``
    back to within ``0.5 / FRACTIONAL_MAX``.

    Args:
        source: the source image (pydicom Dataset; pixel data not needed).
        prob: (H, W) float map on the source grid.
        version: bundle version.
        kind: object kind for UIDs and the series number.
        manufacturer: Manufacturer of the new object.
        algorithm: algorithm name (:func:`algorithm_name` of the refinement method).

    Raises:
        ValueError: when ``prob`` is not on the source grid.
    """
    prob = np.asarray(prob, dtype=np.float64)
    rows, cols = int(source.Rows), int(source.Columns)
    if prob.shape != (rows, cols):
        raise ValueError(f"probability shape {prob.shape} does not match the source image ({rows}, {cols})")
    p = np.clip(np.nan_to_num(prob, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)
    seg = _segmentation(source, p, kind, version, "Microcalcification probability", True, manufacturer, algorithm)
    seg.SeriesDescription = "mcref microcalcification probability (refined; research)"
    return seg


def _atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` on a temporary name next to ``path``, renamed into place (:func:`bundle.utils.atomic_path`)."""
    with atomic_path(path, ".dcm") as tmp:
        write(tmp)


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


VIRTUAL_NORMAL_DESCRIPTION = "mcref virtual normal image (research; normalised units)"


def make_virtual_normal(source: Any, values: np.ndarray, version: str, value_range: tuple[float, float]) -> Any:
    """The virtual normal image (the inpainter's calcification-free rendering) as a derived image.

    A :func:`make_map_sc` Secondary Capture (``ImageType`` DERIVED\\SECONDARY) on the source grid
    with the source's patient and study identifiers, pixel spacing, laterality and view, and a
    reference to the source; values in the bundle's normalised units, clipped to ``value_range``.

    Args:
        source: the source image (pydicom Dataset).
        values: (H, W) virtual normal on the source grid.
        version: bundle version (UIDs).
        value_range: (lo, hi) of the stored values, e.g. the runner's ``virtual_normal_range``.
    """
    return make_map_sc(source, values, "virtual_normal", version, value_range=tuple(value_range),
                       description=VIRTUAL_NORMAL_DESCRIPTION)
