"""DICOM objects written by the application, and atomic file writing.

The objects come from :mod:`bundle.dicom` (shared with the bundle's own runner, which writes the
virtual normal image of DICOM inputs the same way), re-exported here:

* :func:`make_seg`: the refined mask as a BINARY SEG, :func:`make_fractional_seg`: the refined
  probability as a FRACTIONAL SEG, both single-frame on the source grid, anatomic region breast
  with the image's laterality;
* :func:`make_virtual_normal` / :func:`make_map_sc`: float maps as 16-bit Secondary Capture;
* :func:`safe_name`: output names of safe characters only.

Derived UIDs are deterministic (from the source SOP Instance UID, the object kind and the bundle
version), so a re-run replaces rather than duplicates the objects in a PACS.

``bundle`` is imported when this module is: in a MONAI Application Package it comes from the
bundle archive, which :func:`deploy.mcref_app.bundle_io.bundle_parser` puts on ``sys.path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundle.dicom import (  # noqa: F401  (re-exported)
    FRACTIONAL_MAX,
    PROB_SCALE,
    _atomic,
    derived_uid,
    header_only,
    make_fractional_seg,
    make_map_sc,
    make_seg,
    make_virtual_normal,
    safe_name,
    write_dataset_atomic,
)

__all__ = [
    "derived_uid",
    "header_only",
    "make_seg",
    "make_fractional_seg",
    "make_map_sc",
    "make_virtual_normal",
    "safe_name",
    "write_dataset_atomic",
    "write_json_atomic",
    "PROB_SCALE",
    "FRACTIONAL_MAX",
]


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
