"""Every file of the input folder, and why a file did not become a DICOM instance.

The SDK's ``DICOMDataLoaderOperator`` silently drops files it cannot read or group (empty files,
non-DICOM files, DICOM files without study/series/instance UIDs, ignored SOP classes, duplicates
at one position). The application screens every file first (:func:`screen_file`) and, after
loading, names the reason for each file that did not become an instance (:func:`dropped_reason`),
so ``summary.json`` accounts for every input file.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["list_input_files", "screen_file", "dropped_reason"]

_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def list_input_files(folder: str | os.PathLike) -> list[str]:
    """All regular files below ``folder`` (recursively, hidden ones included), sorted.

    Args:
        folder: the input folder.

    Raises:
        NotADirectoryError: when ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: the input is not a folder")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p):
                found.append(p)
    return sorted(found)


def screen_file(path: str | os.PathLike) -> str | None:
    """The reason a file cannot be read as DICOM at all, or None when its header reads.

    Args:
        path: the file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        return f"unreadable file: {e.strerror or e}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        pydicom.dcmread(str(p), stop_before_pixels=True)
    except InvalidDicomError:
        return "not a DICOM file (no DICOM preamble/meta header)"
    except Exception as e:  # truncated or corrupt: pydicom raises various errors
        return f"unreadable DICOM file: {type(e).__name__}: {e}"
    return None


def dropped_reason(path: str | os.PathLike, ignored_sop_classes: tuple[str, ...] = ()) -> str:
    """Why a readable DICOM file did not become an instance of the loaded studies.

    Args:
        path: the file (its header reads, see :func:`screen_file`).
        ignored_sop_classes: SOP Class UIDs the loader ignores.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        return f"unreadable DICOM file: {type(e).__name__}: {e}"
    missing = [kw for kw in _REQUIRED_UIDS if not str(ds.get(kw, "") or "").strip()]
    if missing:
        return f"DICOM file without {', '.join(missing)}: not loaded"
    if str(ds.SOPClassUID) in set(ignored_sop_classes):
        return f"SOP class {ds.SOPClassUID} is not an image the DICOM loader handles"
    return "not loaded by the DICOM loader (e.g. a duplicate of another instance at the same position)"
