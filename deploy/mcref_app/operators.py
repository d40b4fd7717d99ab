"""Operators of the mcref MONAI Deploy application.

Graph (see ``app.py``)::

    MCRefDICOMLoaderOperator --dicom_study_list--> DICOMSeriesSelectorOperator
        |        |                                            |
        |        +--dicom_study_list--> MGCaseOperator <--study_selected_series_list
        |                                     | cases
        |                                     v
        |                         MCRefPipelineOperator (the bundle's runner.predict per image)
        |                                     | results
        |                                     v
        +------unread_files-------> MCResultWriterOperator

Every input file travels either as an :class:`~deploy.mcref_app.cases.MGCase` (one per loaded
DICOM instance) or as an "unread file" record; bad input is skipped with a logged reason and a
status record, never with a partial output file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator

from .cases import STATUS_PENDING, MGCase
from .inputs import dropped_reason, list_input_files, screen_file
from .pipeline import run_case
from .writer import ResultWriter

__all__ = [
    "MG_SELECTION_RULES",
    "check_mg_instance",
    "not_selected_reason",
    "MCRefDICOMLoaderOperator",
    "MGCaseOperator",
    "MCRefPipelineOperator",
    "MCResultWriterOperator",
]

logger = logging.getLogger("mcref.deploy")

# DICOMSeriesSelectorOperator rules: mammograms, for presentation or for processing.
MG_SELECTION_RULES = """
{
    "selections": [
        {
            "name": "MG for presentation or processing",
            "conditions": {
                "Modality": "(?i)^MG$",
                "PresentationIntentType": "(?i)^FOR (PRESENTATION|PROCESSING)$"
            }
        }
    ]
}
"""
_INTENTS = ("FOR PRESENTATION", "FOR PROCESSING")
_GREY = ("MONOCHROME1", "MONOCHROME2")


def _spacing(ds: Any) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        try:
            sp = (float(v[0]), float(v[1])) if v is not None and len(v) >= 2 else None
        except (TypeError, ValueError):
            sp = None
        if sp is not None and all(np.isfinite(s) and s > 0 for s in sp):
            return sp
    return None


def not_selected_reason(ds: Any | None, modality: str) -> str:
    """Why a series was not selected by :data:`MG_SELECTION_RULES`, in words.

    Args:
        ds: its first instance (or None).
        modality: the series' Modality.
    """
    if (modality or "").upper() != "MG":
        return f"not a mammogram: Modality is {modality or '(missing)'!r}, MG expected"
    intent = str(ds.get("PresentationIntentType", "") if ds is not None else "").upper()
    if intent not in _INTENTS:
        return f"PresentationIntentType is {intent or '(missing)'!r}; FOR PRESENTATION or FOR PROCESSING expected"
    return "not selected by the series selection rules"


def check_mg_instance(ds: Any) -> str | None:
    """The reason a selected MG instance cannot be processed, or None when it can.

    Checks, in order: pixel data present, a single frame, grey scale (MONOCHROME1/2, one sample),
    pixel spacing (PixelSpacing or ImagerPixelSpacing) and a transfer syntax pydicom can decode here.

    Args:
        ds: the instance (pydicom Dataset).
    """
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        return "not an image: no pixel data"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames, e.g. tomosynthesis): a single-frame 2-D mammogram is expected"
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in _GREY:
        return (
            f"colour or unsupported photometric interpretation ({photometric or '?'}, SamplesPerPixel={samples}): "
            "a grey-scale MONOCHROME1/MONOCHROME2 mammogram is expected"
        )
    if _spacing(ds) is None:
        return "missing pixel spacing: neither PixelSpacing nor ImagerPixelSpacing holds a valid value"
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            return f"unsupported transfer syntax {getattr(ts, 'name', ts)} ({ts}): no pixel data decoder"
        if not decoder.is_available:
            return f"unsupported transfer syntax {ts.name} ({ts}): its decoder is not installed here"
    return None


class MCRefDICOMLoaderOperator(DICOMDataLoaderOperator):
    """The SDK's DICOM loader, accounting for every input file.

    Each file below the input folder is screened first (:func:`inputs.screen_file`: empty, not
    DICOM, unreadable); the rest go to the SDK's loader, which groups them into studies. Files
    that did not become an instance (screened out, or dropped by the loader: no UIDs, an ignored
    SOP class, a duplicate) are emitted with their reason on ``unread_files``. An input without
    any study is not an error here (``must_load`` is off): the summary says so.

    Named outputs: ``dicom_study_list`` (as the SDK's) and ``unread_files`` (list of
    ``{"source", "reason"}``).

    Args:
        fragment: the application.
        input_folder: the input folder.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_folder: Path, **kwargs: Any) -> None:
        self.unread: list[dict[str, str]] = []
        super().__init__(fragment, *args, input_folder=Path(input_folder), must_load=False, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:  # noqa: D102
        super().setup(spec)
        spec.output("unread_files")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:  # noqa: D102
        self.unread = []
        super().compute(op_input, op_output, context)
        op_output.emit(list(self.unread), "unread_files")

    def load_data_to_studies(self, input_path: Path) -> list[Any]:
        """Screen every file, load the readable ones into studies, record the others.

        Args:
            input_path: the input folder.
        """
        files = list_input_files(input_path)
        readable = []
        for f in files:
            reason = screen_file(f)
            if reason is None:
                readable.append(f)
            else:
                self.unread.append({"source": f, "reason": reason})
        studies = self._load_data(readable)
        loaded = {
            str(getattr(inst.get_native_sop_instance(), "filename", "") or "")
            for study in studies
            for series in study.get_all_series()
            for inst in series.get_sop_instances()
        }
        ignored = tuple(str(u) for u in getattr(self, "SOP_CLASSES_TO_IGNORE", ()) or ())
        for f in readable:
            if f not in loaded:
                self.unread.append({"source": f, "reason": dropped_reason(f, ignored)})
        logger.info("input %s: %d files, %d loaded as DICOM instances, %d not loaded",
                    input_path, len(files), len(loaded), len(self.unread))
        return studies


class MGCaseOperator(Operator):
    """One case per DICOM instance; the selected single-frame MG images become pending cases.

    Series the selector did not pick, and unsuitable instances (multi-frame, colour, no spacing,
    undecodable transfer syntax), become skipped cases with a reason. Pixel data are not decoded
    here: the bundle's pipeline reads each file itself.

    Named inputs:
        dicom_study_list: all studies (from the loader), for the status records.
        study_selected_series_list: the series picked by DICOMSeriesSelectorOperator.

    Named output:
        cases: list of :class:`MGCase`.

    Args:
        fragment: the application.
    """

    def setup(self, spec: OperatorSpec) -> None:  # noqa: D102
        spec.input("dicom_study_list")
        spec.input("study_selected_series_list")
        spec.output("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:  # noqa: D102
        studies = op_input.receive("dicom_study_list") or []
        selected = op_input.receive("study_selected_series_list") or []
        op_output.emit(self.make_cases(studies, selected), "cases")

    @staticmethod
    def make_cases(studies: Sequence[Any], selected: Sequence[Any]) -> list[MGCase]:
        """One case per instance of every series of every study.

        Args:
            studies: DICOMStudy objects.
            selected: StudySelectedSeries objects.
        """
        chosen = {str(ss.series.SeriesInstanceUID) for st in selected for ss in st.selected_series}
        cases: list[MGCase] = []
        for study in studies:
            for series in study.get_all_series():
                suid = str(series.SeriesInstanceUID)
                datasets = [i.get_native_sop_instance() for i in series.get_sop_instances()]
                modality = str(series.Modality or "")
                for ds in datasets:
                    c = MGCase(
                        study_uid=str(study.StudyInstanceUID),
                        series_uid=suid,
                        sop_uid=str(ds.get("SOPInstanceUID", "")),
                        modality=modality,
                        source_path=str(getattr(ds, "filename", "") or ""),
                        dataset=ds,
                    )
                    reason = check_mg_instance(ds) if suid in chosen else not_selected_reason(datasets[0], modality)
                    if reason:
                        c.skip(reason)
                        logger.warning("skipped series %s instance %s: %s", suid, c.sop_uid or "-", reason)
                    cases.append(c)
        return cases


class MCRefPipelineOperator(Operator):
    """The bundle's two-stage pipeline (SegAI, then the generative refinement) on every case.

    Calls ``runner.predict(path)`` of the bundle's runner (``configs/inference.json#runner``,
    built by :func:`deploy.mcref_app.bundle_io.bundle_runner`) per pending case, exactly as a
    bundle run does per file, and keeps the refined mask, the refined probability and the
    virtual normal image on the source grid (:func:`deploy.mcref_app.pipeline.run_case`). A case
    whose input is unsuitable (``MammogramError``, e.g. no breast found) is skipped; any other
    error fails that case only.

    Named input: ``cases`` (list of MGCase). Named output: ``results`` (the same list).

    Args:
        fragment: the application.
        runner: the bundle's runner.
    """

    def __init__(self, fragment: Fragment, *args: Any, runner: Any, **kwargs: Any) -> None:
        self.runner = runner
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:  # noqa: D102
        spec.input("cases")
        spec.output("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:  # noqa: D102
        cases: list[MGCase] = op_input.receive("cases") or []
        for case in cases:
            if case.status == STATUS_PENDING:
                run_case(self.runner, case)
        op_output.emit(cases, "results")


class MCResultWriterOperator(Operator):
    """Write the DICOM results and the status records (:class:`deploy.mcref_app.writer.ResultWriter`).

    Named inputs: ``results`` (list of MGCase) and ``unread_files`` (input files that did not
    become an instance, with their reasons).

    Args:
        fragment: the application.
        writer: the result writer (output folder, version, what to write).
    """

    def __init__(self, fragment: Fragment, *args: Any, writer: ResultWriter, **kwargs: Any) -> None:
        self.writer = writer
        self.summary: dict[str, Any] = {}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:  # noqa: D102
        spec.input("results")
        spec.input("unread_files")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:  # noqa: D102
        cases: list[MGCase] = op_input.receive("results") or []
        unread = op_input.receive("unread_files") or []
        self.summary = self.writer.write_all(cases, unread)

