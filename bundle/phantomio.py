"""Writers of synthetic mammograms: MG DICOM files, NIfTI labels, and whole phantom data sets.

:func:`write_mg_dicom` writes a "Digital Mammography X-Ray Image - For Presentation" file
(deterministic UIDs, MONOCHROME1/2, optional RLE), :func:`write_label_nifti` a label aligned with
the pixel array, and :func:`make_dataset` a MONAI data set of phantoms (:func:`make_phantom`) with
its datalist and per-case parameters. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.phantomimage import make_phantom
from bundle.utils import atomic_path

__all__ = ["write_mg_dicom", "write_label_nifti", "make_dataset"]


_SCT_VIEW = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
_MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def write_mg_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    spacing: float | None,
    laterality: str,
    view: str,
    seed: int = 0,
    photometric: str = "MONOCHROME2",
    rle: bool = False,
    patient_id: str = "PHANTOM",
    bits_stored: int = 14,
    use_imager_spacing: bool = False,
    *,
    burned_in_annotation: bool = False,
    derived: bool = False,
    description: str = "mcref synthetic mammogram",
) -> None:
    """Write a Digital Mammography X-Ray Image - For Presentation DICOM file (MG).

    ``pixels`` are bright = dense values. With ``photometric="MONOCHROME1"`` the stored
    values are inverted (``2**bits_stored - 1 - v``), so a reader that inverts MONOCHROME1
    with the same maximum recovers ``pixels``. UIDs derive deterministically from
    ``(patient_id, seed, laterality, view)`` (``pydicom.uid.generate_uid`` with entropy
    sources), so the same inputs give the same file. The file is written to a temporary
    name in the target folder and renamed.

    Args:
        path: destination file.
        pixels: 2-D integer array, values in ``[0, 2**bits_stored - 1]``.
        spacing: pixel size in mm, or None to write no spacing attribute.
        laterality: "L" or "R" (ImageLaterality).
        view: view position, e.g. "CC" or "MLO" (ViewPosition and View Code Sequence).
        seed: entropy for the UIDs.
        photometric: "MONOCHROME2" (bright = dense) or "MONOCHROME1" (stored inverted).
        rle: compress with RLE Lossless.
        patient_id: PatientID (also PatientName, as the family name).
        bits_stored: BitsStored (HighBit = BitsStored - 1, BitsAllocated = 16).
        use_imager_spacing: write ImagerPixelSpacing instead of PixelSpacing.
        burned_in_annotation: value of BurnedInAnnotation ("YES"/"NO").
        derived: ImageType DERIVED/SECONDARY instead of ORIGINAL/PRIMARY (for injected
            real images).
        description: SeriesDescription.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RLELossless, generate_uid

    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"pixels must be an integer array, got {arr.dtype}")
    if not 8 <= int(bits_stored) <= 16:
        raise ValueError(f"bits_stored must lie in [8, 16], got {bits_stored}")
    max_v = (1 << int(bits_stored)) - 1
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > max_v):
        raise ValueError(f"pixel values must lie in [0, {max_v}] for bits_stored={bits_stored}")
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    laterality = laterality.upper()
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    view = view.upper()
    arr = arr.astype(np.uint16)
    stored = (max_v - arr).astype(np.uint16) if photometric == "MONOCHROME1" else arr

    ent = ["mcref", str(patient_id), str(int(seed))]
    study_uid = generate_uid(entropy_srcs=ent + ["study"])
    series_uid = generate_uid(entropy_srcs=ent + ["series", laterality, view])
    sop_uid = generate_uid(entropy_srcs=ent + ["instance", laterality, view])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.ImageType = ["DERIVED", "SECONDARY"] if derived else ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"MCREF{int(seed) % 10**10:010d}"
    ds.Modality = "MG"
    ds.Manufacturer = "mcref"
    ds.ManufacturerModelName = "synthetic"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = description
    ds.PatientName = f"{patient_id}^"  # family name only; the caret says so (pydicom warns otherwise)
    ds.PatientID = str(patient_id)
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DetectorType = "DIRECT"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    ds.ViewPosition = view
    if view in _SCT_VIEW:
        code = Dataset()
        code.CodeValue, code.CodeMeaning = _SCT_VIEW[view]
        code.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = DicomSequence([code])
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence([])
    row_dir = "A" if laterality == "L" else "P"
    col_dir = "F" if view == "MLO" else ("R" if laterality == "L" else "L")
    ds.PatientOrientation = [row_dir, col_dir]
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.OrganExposed = "BREAST"
    ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    if spacing is not None:
        sp = [f"{float(spacing):.6g}", f"{float(spacing):.6g}"]
        if use_imager_spacing:
            ds.ImagerPixelSpacing = sp
        else:
            ds.PixelSpacing = sp
    fg = arr[arr > max_v * 0.05]
    if fg.size == 0:
        fg = arr.ravel()
    sample = fg[:: max(1, fg.size // 500_000)]
    lo, hi = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    centre, width = 0.5 * (lo + hi), max(hi - lo, 1.0)
    if photometric == "MONOCHROME1":
        centre = max_v - centre
    ds.WindowCenter = f"{centre:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.astype("<u2").tobytes()
    if rle:
        ds.compress(RLELossless, generate_instance_uid=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, "".join(path.suffixes)) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_label_nifti(path: str | os.PathLike, label: np.ndarray, spacing: float) -> None:
    """Write a 2-D ``uint8`` label ``(rows, cols)`` as NIfTI, atomically.

    Args:
        path: destination ``.nii.gz`` file.
        label: 2-D label aligned with ``pixel_array[r, c]``.
        spacing: pixel size in mm (affine ``diag(spacing, spacing, 1, 1)``).
    """
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(np.ascontiguousarray(label, dtype=np.uint8), np.diag([spacing, spacing, 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    with atomic_path(path, "".join(path.suffixes)) as tmp:  # nibabel picks the format from the suffix
        nib.save(img, tmp)


def _split_counts(n_cases: int, splits: Sequence[float] | Sequence[int]) -> tuple[int, int, int]:
    """Number of training, validation and test cases.

    Args:
        n_cases: total number of cases.
        splits: three fractions (summing to 1) or three integer counts (summing to n_cases).
    """
    if len(splits) != 3:
        raise ValueError(f"splits must have three entries (training, validation, test), got {splits}")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in splits):
        counts = tuple(int(v) for v in splits)
        if sum(counts) != n_cases or min(counts) < 0:
            raise ValueError(f"split counts {counts} must be >= 0 and sum to n_cases={n_cases}")
        return counts  # type: ignore[return-value]
    fr = [float(v) for v in splits]
    if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {splits} must be >= 0 and sum to 1")
    n_val = int(round(fr[1] * n_cases))
    n_test = int(round(fr[2] * n_cases))
    n_val = min(n_val, n_cases)
    n_test = min(n_test, n_cases - n_val)
    return n_cases - n_val - n_test, n_val, n_test


def _json_ready(obj: Any) -> Any:
    """Convert numpy scalars and tuples inside ``obj`` to plain JSON types.

    Args:
        obj: nested dicts/lists of values.
    """
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically.

    Args:
        path: destination.
        obj: JSON-serialisable object.
    """
    with atomic_path(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_json_ready(obj), fh, indent=1)


def make_dataset(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    shape: Sequence[int] = (1024, 832),
    spacing: float = 0.07,
    splits: Sequence[float] | Sequence[int] = (0.7, 0.15, 0.15),
    with_mcs: bool = True,
    progress: bool = True,
    *,
    negative_fraction: float = 0.0,
    traps: bool = True,
) -> Path:
    """Write a synthetic MG data set: DICOM images, NIfTI labels and a MONAI datalist.

    Files in ``out_dir``: ``case_XXX.dcm`` (a mix of L/R, CC/MLO, some MONOCHROME1, some
    RLE-compressed, PixelSpacing or ImagerPixelSpacing), ``case_XXX_label.nii.gz``
    (``uint8``, array ``(rows, cols)`` aligned with ``pixel_array[r, c]``, affine
    ``diag(spacing, spacing, 1, 1)``), ``datalist.json`` (decathlon style: ``training``,
    ``validation``, ``test`` lists of ``{"image", "label"}`` paths relative to ``out_dir``)
    and ``cases.json`` (per-case parameters and MC cluster descriptions). Everything is
    determined by ``seed``: the same seed gives identical pixel data.

    Args:
        out_dir: output folder (created).
        n_cases: number of cases.
        seed: master seed; case ``i`` uses a seed derived from ``(seed, i)``.
        shape: ``(rows, cols)`` of every image.
        spacing: pixel size in mm.
        splits: fractions (summing to 1) or integer counts for training/validation/test;
            cases are assigned in order.
        with_mcs: insert MC clusters.
        progress: show a tqdm progress bar.
        negative_fraction: fraction of cases without MCs (when ``with_mcs``), chosen at
            random per case.
        traps: add the false-positive traps of :func:`make_phantom`.

    Returns:
        path of ``datalist.json``.
    """
    from tqdm import tqdm

    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_val, _ = _split_counts(n_cases, splits)
    children = np.random.SeedSequence([int(seed), 7]).spawn(n_cases)
    datalist: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    cases: list[dict[str, Any]] = []
    width = max(3, len(str(n_cases - 1)))
    for i in tqdm(range(n_cases), desc="phantoms", disable=not progress):
        rng = np.random.default_rng(children[i])
        case_seed = int(children[i].generate_state(1)[0])
        lat = "L" if rng.random() < 0.5 else "R"
        view = "CC" if rng.random() < 0.5 else "MLO"
        photometric = "MONOCHROME1" if rng.random() < 0.25 else "MONOCHROME2"
        rle = bool(rng.random() < 0.2)
        imager = bool(rng.random() < 0.5)
        mcs = bool(with_mcs and rng.random() >= negative_fraction)
        ph = make_phantom(
            shape=shape, spacing=spacing, view=view, laterality=lat, seed=case_seed, with_mcs=mcs, traps=traps
        )
        name = f"case_{i:0{width}d}"
        pid = f"MCREF{int(seed) % 100000:05d}{i:0{width}d}"
        write_mg_dicom(
            out / f"{name}.dcm",
            ph["image"],
            spacing,
            lat,
            view,
            seed=case_seed,
            photometric=photometric,
            rle=rle,
            patient_id=pid,
            bits_stored=14,
            use_imager_spacing=imager,
            burned_in_annotation=traps,
        )
        write_label_nifti(out / f"{name}_label.nii.gz", ph["label"], spacing)
        split = "training" if i < n_train else ("validation" if i < n_train + n_val else "test")
        datalist[split].append({"image": f"{name}.dcm", "label": f"{name}_label.nii.gz"})
        info = ph["info"]
        cases.append(
            {
                "case": name,
                "split": split,
                "seed": case_seed,
                "laterality": lat,
                "view": view,
                "photometric": photometric,
                "rle": rle,
                "imager_pixel_spacing": imager,
                "with_mcs": mcs,
                "n_clusters": len(info["clusters"]),
                "n_mcs": sum(len(c["mcs"]) for c in info["clusters"]),
                "label_pixels": int(ph["label"].sum()),
                "info": info,
            }
        )
    _write_json(out / "cases.json", cases)
    path = out / "datalist.json"
    _write_json(path, datalist)
    return path
