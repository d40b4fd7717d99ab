"""Per-image work items that flow through the application's operators, and their statuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MGCase", "STATUS_OK", "STATUS_SKIPPED", "STATUS_FAILED", "series_status"]

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"  # bad or unsuitable input: a reason is logged, nothing is written
STATUS_FAILED = "failed"  # the input looked fine but processing broke: a bug or a resource problem


@dataclass
class MGCase:
    """One DICOM instance (or one series without usable instances) and what became of it.

    Args:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        sop_uid: SOPInstanceUID ("" when the series has no instance to speak of).
        modality: the series' Modality.
        source_path: file the instance was read from.
        dataset: the source instance (pydicom Dataset) for the writers; dropped once written.
        image: the SDK ``Image`` handed to the bundle operator (None when skipped).
        status: ``STATUS_OK``, ``STATUS_SKIPPED``, ``STATUS_FAILED`` or "pending".
        reason: why it was skipped or failed.
        mask: (H, W) uint8 mask on the source grid once inferred.
        prob: (H, W) float32 probability map on the source grid once inferred.
        maps: further (H, W) float maps on the source grid to write (hook for the virtual
            normal image of the generative refinement).
        outputs: written files by kind ("seg", "prob", ...).
    """

    study_uid: str
    series_uid: str
    sop_uid: str = ""
    modality: str = ""
    source_path: str = ""
    dataset: Any = None
    image: Any = None
    status: str = "pending"
    reason: str = ""
    mask: Any = None
    prob: Any = None
    maps: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    mask_pixels: int | None = None

    def skip(self, reason: str) -> None:
        """Mark as skipped (unsuitable input) and drop the pixel data.

        Args:
            reason: the reason, in words.
        """
        self.status, self.reason = STATUS_SKIPPED, str(reason)
        self.image = None

    def fail(self, reason: str) -> None:
        """Mark as failed (processing error) and drop the pixel data.

        Args:
            reason: the reason, in words.
        """
        self.status, self.reason = STATUS_FAILED, str(reason)
        self.image = None

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
