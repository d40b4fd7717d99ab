"""DICOM objects written by the application, and atomic file writing.

* The microcalcification mask becomes a binary DICOM Segmentation (highdicom) whose single
  frame lies on the source image's pixel grid (``frame[r, c]`` belongs to ``pixel_array[r, c]``),
  segment property "Calcification of breast" (SCT 309587003), referencing the source image.
* Float maps on the source grid (the probability map, the virtual normal image) become
  16-bit Secondary Capture images: :func:`bundle.dicom.make_map_sc` (shared with the bundle's
  own inference, which writes the virtual normal image of DICOM inputs the same way).

Derived UIDs are deterministic (from the source SOP Instance UID, the object kind and the model
version), so a re-run replaces rather than duplicates the objects in a PACS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "derived_uid",
    "header_only",
    "make_seg",
    "make_map_sc",
    "write_dataset_atomic",
    "write_json_atomic",
    "PROB_SCALE",
]

from bundle.dicom import (  # noqa: E402  (shared with the bundle; re-exported here)
    _SERIES_NUMBERS,
    PROB_SCALE,
    _atomic,
    derived_uid,
    header_only,
    make_map_sc,
    write_dataset_atomic,
)


def _algorithm(version: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name="mcref SegAI", version=str(version), family=codes.cid7162.ArtificialIntelligence
    )


def make_seg(source: Any, mask: np.ndarray, version: str, manufacturer: str = "mcref") -> Any:
    """A binary DICOM Segmentation of microcalcifications for one source mammogram.

    Args:
        source: the source image (pydicom Dataset; pixel data not needed).
        mask: (H, W) array, nonzero = microcalcification, on the source grid
            (``mask[r, c]`` belongs to ``pixel_array[r, c]``).
        version: model/bundle version (algorithm version, software version, UIDs).
        manufacturer: Manufacturer of the new object.

    Returns:
        The highdicom ``Segmentation`` (a pydicom Dataset) with exactly one frame.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask)
    rows, cols = int(source.Rows), int(source.Columns)
    if mask.shape != (rows, cols):
        raise ValueError(f"mask shape {mask.shape} does not match the source image ({rows}, {cols})")
    category = getattr(codes.SCT, "MorphologicallyAbnormalStructure", None) or codes.SCT.Tissue
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Microcalcification",
        segmented_property_category=category,
        segmented_property_type=codes.SCT.CalcificationOfBreast,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(version),
    )
    sop = str(source.SOPInstanceUID)
    seg = hd.seg.Segmentation(
        source_images=[header_only(source)],
        pixel_array=(mask > 0).astype(np.uint8)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=derived_uid(sop, "seg-series", version),
        series_number=_SERIES_NUMBERS["seg"],
        sop_instance_uid=derived_uid(sop, "seg", version),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="mcref SegAI",
        software_versions=str(version),
        device_serial_number="0",
        content_description="Microcalcification segmentation (research use only)",
        content_label="MC_SEG",
        omit_empty_frames=False,
    )
    seg.SeriesDescription = "mcref microcalcification SEG (research)"
    return seg


def write_json_atomic(obj: Mapping[str, Any] | list, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temporary file + rename).

    Args:
        obj: JSON-serialisable object.
        path: destination file.
    """
    p = Path(path)

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    _atomic(p, _write)
    return p
