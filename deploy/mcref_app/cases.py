"""Per-image work items that flow through the application's operators, and their statuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MGCase", "STATUS_PENDING", "STATUS_OK", "STATUS_SKIPPED", "STATUS_FAILED", "series_status"]

STATUS_PENDING = "pending"  # selected and checked, waiting for the pipeline
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"  # bad or unsuitable input: a reason is logged, nothing is written
STATUS_FAILED = "failed"  # the input looked fine but processing broke: a bug or a resource problem


@dataclass
class MGCase:
    """One DICOM instance (one input file) and what became of it.

    Args:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        sop_uid: SOPInstanceUID.
        modality: the series' Modality.
        source_path: the file the instance was read from.
        dataset: the source instance (pydicom Dataset) for the writers; dropped once written.
        status: ``STATUS_PENDING``, ``STATUS_OK``, ``STATUS_SKIPPED`` or ``STATUS_FAILED``.
        reason: why it was skipped or failed.
        mask: (H, W) uint8 refined mask on the source grid (the product), once inferred.
        prob: (H, W) float32 refined probability on the source grid, once inferred.
        virtual_normal: (H, W) float32 virtual normal image on the source grid, once inferred.
        mask_pixels: pixels of the refined mask.
        segai_mask_pixels: pixels of SegAI's own (high-sensitivity) mask, for the record.
        outputs: written files by kind ("seg", "prob", "virtual_normal").
    """

    study_uid: str
    series_uid: str
    sop_uid: str = ""
    modality: str = ""
    source_path: str = ""
    dataset: Any = None
    status: str = STATUS_PENDING
    reason: str = ""
    mask: Any = None
    prob: Any = None
    virtual_normal: Any = None
    mask_pixels: int | None = None
    segai_mask_pixels: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Mark as skipped (unsuitable input) and drop the results.

        Args:
            reason: the reason, in words.
        """
        self.status, self.reason = STATUS_SKIPPED, str(reason)
        self.drop_arrays()

    def fail(self, reason: str) -> None:
        """Mark as failed (processing error) and drop the results.

        Args:
            reason: the reason, in words.
        """
        self.status, self.reason = STATUS_FAILED, str(reason)
        self.drop_arrays()

    def drop_arrays(self) -> None:
        """Forget the result arrays (after writing, or when the case is not processed)."""
        self.mask = self.prob = self.virtual_normal = None

    def record(self) -> dict[str, Any]:
        """The JSON-ready status record of this instance."""
        rec: dict[str, Any] = {
            "sop_instance_uid": self.sop_uid,
            "source": self.source_path,
            "status": self.status,
            "reason": self.reason,
            "outputs": dict(self.outputs),
        }
        if self.mask_pixels is not None:
            rec["mask_pixels"] = int(self.mask_pixels)
        if self.segai_mask_pixels is not None:
            rec["segai_mask_pixels"] = int(self.segai_mask_pixels)
        return rec


def series_status(statuses: list[str]) -> str:
    """Status of a series from its instances' statuses.

    ``ok`` when every instance is ok, ``failed`` when any failed, ``skipped`` when none was
    processed, ``partial`` when some were processed and others skipped.

    Args:
        statuses: the instances' statuses.
    """
    if not statuses:
        return STATUS_SKIPPED
    if STATUS_FAILED in statuses:
        return STATUS_FAILED
    if all(s == STATUS_OK for s in statuses):
        return STATUS_OK
    if all(s == STATUS_SKIPPED for s in statuses):
        return STATUS_SKIPPED
    return "partial"
