"""Operators of the mcref MONAI Deploy application.

Graph (see ``app.py``)::

    DICOMDataLoaderOperator --dicom_study_list--> DICOMSeriesSelectorOperator
            |                                              |
            +--dicom_study_list--> MGImageOperator <--study_selected_series_list
                                        | cases
                                        v
                         MCRefBundleInferenceOperator (a MonaiBundleInferenceOperator)
                                        | results
                                        v
                                MCResultWriterOperator

Every image travels as an :class:`~deploy.mcref_app.cases.MGCase`; bad input is skipped with a
logged reason and a status record, never with a partial output file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.deploy.core import Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
    filter_compose,
)

from .cases import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, MGCase, series_status

__all__ = [
    "MG_SELECTION_RULES",
    "check_mg_instance",
    "MGImageOperator",
    "MCRefBundleInferenceOperator",
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


class MGImageOperator(Operator):
    """Turn every single-frame MG instance of the selected series into an SDK ``Image``.

    Each instance is read with the bundle's own loader (``bundle.data.LoadMammogramd`` as set up
    in ``configs/inference.json``): ``(1, H, W)`` float32, "bright = dense" (MONOCHROME1
    inverted), rescale applied. Its geometry comes from PixelSpacing / ImagerPixelSpacing (the
    SDK gives single-image MG series no affine): ``spacing`` (row, col) mm, ``original_affine``
    (3x3, pixel index -> mm in the detector plane) and the SDK's ``row_pixel_spacing`` /
    ``col_pixel_spacing`` / ``dicom_affine_transform`` keys.

    Series the selector did not pick, and unsuitable instances (multi-frame, colour, no spacing,
    undecodable transfer syntax, unreadable), become skipped cases with a reason.

    Named inputs:
        dicom_study_list: all studies (from DICOMDataLoaderOperator), for the status records.
        study_selected_series_list: the series picked by DICOMSeriesSelectorOperator.

    Named output:
        cases: list of :class:`MGCase`.

    Args:
        fragment: the application.
        loader: ``path -> MetaTensor (1, H, W)``, the bundle's loader (see ``bundle_io.bundle_loader``).
    """

    def __init__(self, fragment: Fragment, *args: Any, loader: Callable[[str], Any], **kwargs: Any) -> None:
        self._loader = loader
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:  # noqa: D102
        spec.input("dicom_study_list")
        spec.input("study_selected_series_list")
        spec.output("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:  # noqa: D102
        studies = op_input.receive("dicom_study_list") or []
        selected = op_input.receive("study_selected_series_list") or []
        op_output.emit(self.make_cases(studies, selected), "cases")

    def make_cases(self, studies: Sequence[Any], selected: Sequence[Any]) -> list[MGCase]:
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
                instances = list(series.get_sop_instances())
                datasets = [i.get_native_sop_instance() for i in instances]
                modality = str(series.Modality or "")
                if suid not in chosen:
                    reason = not_selected_reason(datasets[0] if datasets else None, modality)
                    for ds in datasets or [None]:
                        c = self._case(study, suid, modality, ds)
                        c.skip(reason)
                        logger.warning("skipped series %s instance %s: %s", suid, c.sop_uid or "-", reason)
                        cases.append(c)
                    continue
                for ds in datasets:
                    c = self._case(study, suid, modality, ds)
                    self._prepare(c)
                    cases.append(c)
        return cases

    @staticmethod
    def _case(study: Any, series_uid: str, modality: str, ds: Any | None) -> MGCase:
        return MGCase(
            study_uid=str(study.StudyInstanceUID),
            series_uid=series_uid,
            sop_uid=str(ds.get("SOPInstanceUID", "")) if ds is not None else "",
            modality=modality,
            source_path=str(getattr(ds, "filename", "") or "") if ds is not None else "",
            dataset=ds,
        )

    def _prepare(self, case: MGCase) -> None:
        reason = check_mg_instance(case.dataset)
        if reason:
            case.skip(reason)
            logger.warning("skipped %s (series %s): %s", case.sop_uid, case.series_uid, reason)
            return
        try:
            case.image = self.to_image(case)
        except Exception as e:
            problem = _input_problem(e)
            if problem is not None:  # unreadable or unsuitable input
                case.skip(problem)
                logger.warning("skipped %s (series %s): %s", case.sop_uid, case.series_uid, problem)
            else:  # a reader bug, not the input's fault
                case.fail(f"{type(e).__name__}: {e}")
                logger.exception("failed to read %s", case.sop_uid)

    def to_image(self, case: MGCase) -> Image:
        """Read one instance with the bundle's loader and wrap it as an SDK ``Image``.

        Args:
            case: the case; its ``source_path`` is read (a temporary copy of its dataset when
                it did not come from a file).
        """
        ds = case.dataset
        path = case.source_path
        tmp = None
        if not path or not Path(path).is_file():
            fd, tmp = tempfile.mkstemp(suffix=".dcm")
            os.close(fd)
            ds.save_as(tmp, enforce_file_format=True)
            path = tmp
        try:
            img = self._loader(path)
        finally:
            if tmp:
                os.remove(tmp)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if tuple(img.shape) != (1, rows, cols):
            raise RuntimeError(f"loader gave shape {tuple(img.shape)}, expected (1, {rows}, {cols})")
        meta = dict(img.meta)
        sp = tuple(float(s) for s in meta["spacing"])
        affine4 = np.diag([sp[0], sp[1], 1.0, 1.0])
        meta.update(
            {
                "row_pixel_spacing": sp[0],
                "col_pixel_spacing": sp[1],
                "depth_pixel_spacing": 1.0,
                "dicom_affine_transform": affine4,
                "original_affine": np.asarray(meta.get("original_affine", np.diag([sp[0], sp[1], 1.0]))),
                "study_instance_uid": case.study_uid,
                "series_instance_uid": case.series_uid,
                "sop_instance_uid": case.sop_uid,
            }
        )
        return Image(np.ascontiguousarray(img.as_tensor().numpy()), metadata=meta)


def _input_problem(exc: BaseException) -> str | None:
    """The problem text of a ``MammogramError`` in ``exc``'s cause chain (MONAI wraps it), else None."""
    from bundle.data import MammogramError

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, MammogramError):
            return e.problem
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class _PortIn:
    """Stand-in for an operator input context holding one value per port name."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def receive(self, name: str) -> Any:
        return self.values.get(name)


class _PortOut:
    """Stand-in for an operator output context collecting what is emitted."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, name: str) -> None:  # the SDK asks for a DISK path; in-memory here
        return None

    def emit(self, value: Any, name: str, *args: Any, **kwargs: Any) -> None:
        self.values[name] = value


class MCRefBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's MONAI bundle operator, run once per case of a list.

    The bundle's ``preprocessing``, ``inferer``, ``postprocessing`` and network are used as the
    SDK sets them up, with these adaptations (the bundle itself is unchanged):

    * file loaders (``Load*`` transforms) are dropped from ``preprocessing``: the image arrives
      already read by :class:`MGImageOperator` with the same loader;
    * a bare transform given as ``postprocessing`` is wrapped in a ``Compose``;
    * ``bundle_root`` is set to the bundle folder, so ``ckpt_path`` resolves there;
    * only the ``breast`` mask is passed to the inferer besides the image;
    * ``post_process`` does what ``bundle.engine.MammogramInference`` does between the inferer
      and the writers: ``prob`` and ``mask = prob >= threshold`` on the working grid, the
      bundle's postprocessing (``RestoreGeometryd``) back to the source grid, then
      ``mask > 0.5`` (uint8) and ``prob`` clipped to [0, 1]. Outputs: ``pred`` (the mask as an
      SDK ``Image``) and ``prob`` (float32 array).

    Per case, the parent's ``compute`` runs unchanged with in-memory stand-ins for its ports; a
    case that raises is marked skipped (``MammogramError``: bad input) or failed (anything else),
    and the others go on.

    Named input: ``cases`` (list of MGCase). Named output: ``results`` (the same list).

    Args:
        fragment: the application.
        app_context: the SDK application context (its ``models`` must be None: the network
            comes from the bundle folder).
        bundle_path: bundle root folder.
        config_names: bundle config files merged in order (default ``["inference"]``).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        app_context: Any,
        bundle_path: str | os.PathLike,
        config_names: Sequence[str] = ("inference",),
        **kwargs: Any,
    ) -> None:
        self._threshold = 0.5
        super().__init__(
            fragment,
            *args,
            app_context=app_context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY), IOMapping("prob", np.ndarray, IOType.IN_MEMORY)],
            bundle_path=str(bundle_path),
            bundle_config_names=BundleConfigNames(config_names=list(config_names)),
            **kwargs,
        )

    def setup(self, spec: OperatorSpec) -> None:  # noqa: D102
        spec.input("cases")
        spec.output("results")

    # -------------------------------------------------------------- bundle set-up
    def _init_config(self, config_names: list[str]) -> None:
        super()._init_config(config_names)
        if self.bundle_path is not None and Path(self.bundle_path).is_dir():
            self._parser["bundle_root"] = str(self.bundle_path)
        if self._parser.get("threshold") is not None:
            self._threshold = float(self._parser.get_parsed_content("threshold"))
        self._outputs = dict(self._outputs)
        self._outputs["prob"] = {"type": np.ndarray}

    def _get_compose(self, obj_name: str, disallowed_prefixes: Iterable[str]) -> Any:
        from monai.transforms import Compose

        if self._parser.get(obj_name) is None:
            return Compose([])
        obj = self._parser.get_parsed_content(obj_name)
        if not isinstance(obj, Compose):
            obj = Compose(list(obj) if isinstance(obj, (list, tuple)) else [obj])
        if obj_name == self._bundle_config_names.preproc_name:
            obj = Compose([t for t in obj.transforms if not type(t).__name__.startswith("Load")])
        return filter_compose(obj, list(disallowed_prefixes))

    # -------------------------------------------------------------- per case
    def predict(self, data: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self._inferer(data, self._model_network, breast=kwargs.get("breast"))

    def post_process(self, data: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:  # noqa: D102
        import torch
        from monai.data import MetaTensor

        inputs = dict(kwargs.get(self.kw_preprocessed_inputs, {}))
        image = inputs["image"]
        prob = data[0] if data.ndim == 4 else data
        prob = (prob.as_tensor() if hasattr(prob, "as_tensor") else prob).detach().cpu()
        meta = dict(getattr(image, "meta", {}) or {})
        d = dict(inputs)
        d["prob"] = MetaTensor(prob, meta=dict(meta))
        d["mask"] = MetaTensor((prob >= self._threshold).to(torch.float32), meta=dict(meta))
        d = self._postproc(d)
        out = {
            "pred": (np.asarray(d["mask"][0].cpu()) > 0.5).astype(np.uint8)[None],
            "prob": np.clip(np.nan_to_num(np.asarray(d["prob"][0].cpu(), dtype=np.float32)), 0.0, 1.0)[None],
        }
        if "virtual_normal" in d:  # hook: the generative refinement's virtual normal image
            out["virtual_normal"] = np.asarray(d["virtual_normal"][0].cpu(), dtype=np.float32)[None]
        return out

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:  # noqa: D102
        cases: list[MGCase] = op_input.receive("cases") or []
        for case in cases:
            if case.image is None:
                continue
            port_out = _PortOut()
            try:
                super().compute(_PortIn({"image": case.image}), port_out, context)
                mask_img = port_out.values["pred"]
                mask = mask_img.asnumpy() if hasattr(mask_img, "asnumpy") else np.asarray(mask_img)
                prob = np.asarray(port_out.values["prob"])[0]
                shape = (int(case.dataset.Rows), int(case.dataset.Columns))
                if mask.shape != shape or prob.shape != shape:
                    raise RuntimeError(f"outputs {mask.shape}/{prob.shape} are not on the source grid {shape}")
                case.mask, case.prob = mask.astype(np.uint8), prob.astype(np.float32)
                case.mask_pixels = int(case.mask.sum())
                case.status = STATUS_OK
                case.image = None
                logger.info("inferred %s: %d MC pixels", case.sop_uid, case.mask_pixels)
            except Exception as e:
                problem = _input_problem(e)
                if problem is not None:  # the input's fault (e.g. no breast found): skip it
                    case.skip(problem)
                    logger.warning("skipped %s (series %s): %s", case.sop_uid, case.series_uid, problem)
                else:
                    case.fail(f"{type(e).__name__}: {e}")
                    logger.exception("inference failed on %s", case.sop_uid)
        op_output.emit(cases, "results")


class MCResultWriterOperator(Operator):
    """Write the DICOM results and the status records, atomically.

    Per processed instance, in ``OUT/<SeriesInstanceUID>/``:
    ``<SOPInstanceUID>_seg.dcm`` (binary SEG, "Calcification of breast") and
    ``<SOPInstanceUID>_prob.dcm`` (16-bit Secondary Capture of the probability map). Per series:
    ``OUT/<SeriesInstanceUID>/status.json``; for the whole run: ``OUT/summary.json`` (studies,
    series, instances and their statuses; a study without a usable breast image is reported as
    skipped). Both objects of an instance are built in memory before either is written; each
    file is written to a temporary name and renamed.

    Named input: ``results`` (list of MGCase).

    Args:
        fragment: the application.
        output_folder: where the results go.
        version: model/bundle version recorded in the objects.
        write_prob: also write the probability map.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_folder: str | os.PathLike,
        version: str = "0",
        write_prob: bool = True,
        **kwargs: Any,
    ) -> None:
        self.output_folder = Path(output_folder)
        self.version = str(version)
        self.write_prob = write_prob
        self.summary: dict[str, Any] = {}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:  # noqa: D102
        spec.input("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:  # noqa: D102
        cases: list[MGCase] = op_input.receive("results") or []
        self.summary = self.write_all(cases)

    @staticmethod
    def _safe(uid: str) -> str:
        return "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in uid) or "unknown"

    def write_case(self, case: MGCase) -> None:
        """Write the DICOM objects of one processed case (nothing when it was not processed).

        Args:
            case: an ``ok`` case with ``mask``, ``prob`` and ``dataset``.
        """
        from .dicom_out import make_map_sc, make_seg, write_dataset_atomic

        if case.status != STATUS_OK:
            return
        folder = self.output_folder / self._safe(case.series_uid)
        stem = self._safe(case.sop_uid)
        objects = {"seg": make_seg(case.dataset, case.mask, self.version)}
        if self.write_prob:
            objects["prob"] = make_map_sc(case.dataset, case.prob, "prob", self.version)
        for name, values in case.maps.items():  # e.g. the virtual normal image, when provided
            lo, hi = float(np.min(values)), float(np.max(values))
            objects[name] = make_map_sc(
                case.dataset, values, name, self.version, value_range=(lo, hi if hi > lo else lo + 1.0),
                description=f"mcref {name.replace('_', ' ')} (research)",
            )
        for name, ds in objects.items():
            path = write_dataset_atomic(ds, folder / f"{stem}_{name}.dcm")
            case.outputs[name] = str(path)

    def write_all(self, cases: list[MGCase]) -> dict[str, Any]:
        """Write every case's outputs, the per-series ``status.json`` and ``summary.json``.

        Args:
            cases: all cases of the run.

        Returns:
            The summary written to ``summary.json``.
        """
        from .dicom_out import write_json_atomic

        self.output_folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            try:
                self.write_case(case)
            except Exception as e:
                case.fail(f"writing the DICOM results failed: {type(e).__name__}: {e}")
                case.outputs.clear()
                logger.exception("writing results of %s failed", case.sop_uid)
            finally:
                case.dataset = None
                case.mask = case.prob = None
                case.maps = {}
        by_series: dict[str, list[MGCase]] = {}
        for case in cases:
            by_series.setdefault(case.series_uid, []).append(case)
        series_records = []
        for suid, items in by_series.items():
            statuses = [c.status for c in items]
            reasons = sorted({c.reason for c in items if c.reason})
            rec = {
                "study_instance_uid": items[0].study_uid,
                "series_instance_uid": suid,
                "modality": items[0].modality,
                "status": series_status(statuses),
                "reason": "; ".join(reasons),
                "instances": [c.record() for c in items],
            }
            write_json_atomic(rec, self.output_folder / self._safe(suid) / "status.json")
            series_records.append(rec)
        studies: dict[str, list[dict]] = {}
        for rec in series_records:
            studies.setdefault(rec["study_instance_uid"], []).append(rec)
        study_records = []
        for stuid, recs in studies.items():
            ok = any(i["status"] == STATUS_OK for r in recs for i in r["instances"])
            failed = any(r["status"] == STATUS_FAILED for r in recs)
            status = STATUS_FAILED if failed else STATUS_OK if ok else STATUS_SKIPPED
            reason = "" if ok or failed else "study without a usable breast (MG) image"
            if reason:
                logger.warning("study %s skipped: %s", stuid, reason)
            study_records.append({"study_instance_uid": stuid, "status": status, "reason": reason,
                                  "series": [r["series_instance_uid"] for r in recs]})
        all_inst = [i for r in series_records for i in r["instances"]]
        summary = {
            "version": self.version,
            "counts": {s: sum(i["status"] == s for i in all_inst) for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)},
            "studies": study_records,
            "series": series_records,
        }
        if not study_records:
            summary["reason"] = "no DICOM study found in the input"
            logger.warning("no DICOM study found in the input")
        write_json_atomic(summary, self.output_folder / "summary.json")
        logger.info("results: %s; summary in %s", summary["counts"], self.output_folder / "summary.json")
        return summary
