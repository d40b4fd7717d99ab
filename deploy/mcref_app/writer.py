"""Writing the application's results: DICOM objects per image, status files, all inside OUT.

Layout (every name from :func:`bundle.dicom.safe_name`: only ``[0-9A-Za-z._-]``, never ``.``,
``..`` or hidden; a UID that is not well formed gets a hash suffix)::

    OUT/summary.json
    OUT/<SeriesInstanceUID>/status.json
    OUT/<SeriesInstanceUID>/<SOPInstanceUID>_seg.dcm             BINARY SEG, the refined mask
    OUT/<SeriesInstanceUID>/<SOPInstanceUID>_prob.dcm            FRACTIONAL SEG, the refined probability
    OUT/<SeriesInstanceUID>/<SOPInstanceUID>_virtual_normal.dcm  derived image (Secondary Capture)

Every path is checked to lie inside ``OUT`` before anything is written; each file is written to a
temporary name and renamed; all objects of an image are built before any is written. No SDK here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cases import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, MGCase, series_status

__all__ = ["ResultWriter", "UnsafeOutputPath"]

logger = logging.getLogger("mcref.deploy")


class UnsafeOutputPath(RuntimeError):
    """An output path would lie outside the output folder."""


class ResultWriter:
    """Write the DICOM results and the status records of a run.

    Args:
        output_folder: where everything goes (created when missing).
        version: bundle version written into the objects and their derived UIDs.
        virtual_normal_range: (lo, hi) of the stored virtual normal values (the runner's).
        write_prob: write the FRACTIONAL SEG of the refined probability.
        write_virtual_normal: write the virtual normal image.
        algorithm: algorithm name in the SEGs (default ``bundle.dicom.ALGORITHM_NAME``).
    """

    def __init__(
        self,
        output_folder: str | os.PathLike,
        version: str,
        virtual_normal_range: Sequence[float] = (-0.5, 1.5),
        write_prob: bool = True,
        write_virtual_normal: bool = True,
        algorithm: str | None = None,
    ) -> None:
        self.output_folder = Path(output_folder)
        self.version = str(version)
        self.virtual_normal_range = (float(virtual_normal_range[0]), float(virtual_normal_range[1]))
        self.write_prob = write_prob
        self.write_virtual_normal = write_virtual_normal
        self.algorithm = algorithm

    # ---------------------------------------------------------------- paths
    def path_for(self, *parts: str) -> Path:
        """``OUT/part/...`` with each part made safe, checked to lie inside ``OUT``.

        Args:
            parts: header-derived names (UIDs, optionally with a suffix already appended).

        Raises:
            UnsafeOutputPath: when the result would leave the output folder (e.g. through a link).
        """
        from bundle.dicom import safe_name

        root = self.output_folder.resolve()
        path = root.joinpath(*[safe_name(p, max_len=128) for p in parts])
        resolved = path.resolve()
        if resolved == root or root not in resolved.parents:
            raise UnsafeOutputPath(f"{path}: output path outside the output folder {root}")
        return path

    def case_path(self, case: MGCase, kind: str) -> Path:
        """Where object ``kind`` of ``case`` goes.

        Args:
            case: the case.
            kind: "seg", "prob" or "virtual_normal".
        """
        from bundle.dicom import safe_name

        return self.path_for(case.series_uid, f"{safe_name(case.sop_uid)}_{kind}.dcm")

    # ---------------------------------------------------------------- objects
    def build(self, case: MGCase) -> dict[str, Any]:
        """The DICOM objects of one processed case, built in memory.

        Args:
            case: an ``ok`` case with ``mask``, ``prob`` (and ``virtual_normal``) and ``dataset``.
        """
        from bundle.dicom import ALGORITHM_NAME, make_fractional_seg, make_seg, make_virtual_normal

        algorithm = self.algorithm or ALGORITHM_NAME
        objects = {"seg": make_seg(case.dataset, case.mask, self.version, algorithm=algorithm)}
        if self.write_prob:
            objects["prob"] = make_fractional_seg(case.dataset, case.prob, self.version, algorithm=algorithm)
        if self.write_virtual_normal and case.virtual_normal is not None:
            objects["virtual_normal"] = make_virtual_normal(case.dataset, case.virtual_normal, self.version,
                                                            self.virtual_normal_range)
        return objects

    def write_case(self, case: MGCase) -> None:
        """Write the DICOM objects of one processed case (nothing when it was not processed).

        Args:
            case: the case; ``case.outputs`` gets the written paths.
        """
        from bundle.dicom import write_dataset_atomic

        if case.status != STATUS_OK:
            return
        objects = self.build(case)
        paths = {kind: self.case_path(case, kind) for kind in objects}
        for kind, ds in objects.items():
            case.outputs[kind] = str(write_dataset_atomic(ds, paths[kind]))

    # ---------------------------------------------------------------- the run
    def write_all(self, cases: list[MGCase], unread: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
        """Write every case's outputs, the per-series ``status.json`` and ``summary.json``.

        Args:
            cases: all cases of the run (one per loaded DICOM instance).
            unread: one ``{"source", "reason"}`` record per input file that did not become an
                instance (empty, not DICOM, no UIDs, ...); counted as skipped.

        Returns:
            The summary written to ``summary.json``: ``counts`` (ok / skipped / failed over all
            input files, and ``files``), ``studies``, ``series`` and ``files_not_loaded``.
        """
        from bundle.dicom import safe_name

        from .dicom_out import write_json_atomic

        self.output_folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            try:
                self.write_case(case)
            except Exception as e:
                for p in case.outputs.values():  # all or nothing per image
                    Path(p).unlink(missing_ok=True)
                case.outputs.clear()
                case.fail(f"writing the DICOM results failed: {type(e).__name__}: {e}")
                logger.exception("writing results of %s failed", case.sop_uid)
            finally:
                case.dataset = None
                case.drop_arrays()
        by_series: dict[str, list[MGCase]] = {}
        for case in cases:
            by_series.setdefault(case.series_uid, []).append(case)
        series_records = []
        for suid, items in by_series.items():
            reasons = sorted({c.reason for c in items if c.reason})
            rec = {
                "study_instance_uid": items[0].study_uid,
                "series_instance_uid": suid,
                "folder": safe_name(suid),
                "modality": items[0].modality,
                "status": series_status([c.status for c in items]),
                "reason": "; ".join(reasons),
                "instances": [c.record() for c in items],
            }
            try:
                write_json_atomic(rec, self.path_for(suid, "status.json"))
            except UnsafeOutputPath as e:  # its folder leads out of OUT: say so in the summary only
                rec["status_file_error"] = str(e)
                logger.error("%s", e)
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
        files = [{"source": str(u["source"]), "status": STATUS_SKIPPED, "reason": str(u["reason"])} for u in unread]
        for f in files:
            logger.warning("skipped input file %s: %s", f["source"], f["reason"])
        statuses = [i["status"] for r in series_records for i in r["instances"]] + [f["status"] for f in files]
        counts: dict[str, int] = {s: statuses.count(s) for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)}
        counts["files"] = len(statuses)
        summary: dict[str, Any] = {
            "version": self.version,
            "counts": counts,
            "studies": study_records,
            "series": series_records,
            "files_not_loaded": files,
        }
        if not study_records:
            summary["reason"] = "no DICOM study found in the input"
            logger.warning("no DICOM study found in the input")
        write_json_atomic(summary, self.path_for("summary.json"))
        logger.info("results: %s; summary in %s", counts, self.output_folder / "summary.json")
        return summary
