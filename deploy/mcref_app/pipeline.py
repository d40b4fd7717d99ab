"""The bundle's own two-stage pipeline, run on one DICOM instance (no SDK needed here).

The application does not reimplement any model step: it builds the bundle's ``runner``
(``configs/inference.json``, :class:`bundle.engine.MammogramInference`) with
:func:`deploy.mcref_app.bundle_io.bundle_runner` and calls ``runner.predict(path)`` per image,
exactly as ``python -m monai.bundle run --config_file configs/inference.json`` does per file.
:func:`result_arrays` turns its outputs into the arrays the bundle writes as
``<stem>_refined_mask.nii.gz`` / ``<stem>_refined_prob.nii.gz`` / ``<stem>_virtual_normal.nii.gz``
(same binarisation and clipping), so the DICOM objects hold those very pixels.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from .cases import STATUS_OK, STATUS_PENDING, MGCase

__all__ = ["result_arrays", "run_case", "input_problem", "PipelineOutputError"]

logger = logging.getLogger("mcref.deploy")


class PipelineOutputError(RuntimeError):
    """The bundle's pipeline did not give what the application writes (e.g. refinement off)."""


def _plane(value: Any) -> np.ndarray:
    """(H, W) numpy array from a (1, H, W) tensor / MetaTensor / array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "as_tensor"):
        value = value.as_tensor()
    arr = np.asarray(value)
    return arr[0] if arr.ndim == 3 else arr


def result_arrays(d: Mapping[str, Any], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The written arrays of one ``runner.predict`` output, on the source grid.

    Args:
        d: the dict returned by ``runner.predict(path)``.
        shape: (Rows, Columns) of the source image.

    Returns:
        ``refined_mask`` (uint8 0/1: ``> 0.5``), ``refined_prob`` (float32 clipped to [0, 1], NaN
        as 0), ``mask`` (SegAI's mask, uint8) and, when the refiner gives one,
        ``virtual_normal`` (float32), exactly as the bundle's runner writes them.

    Raises:
        PipelineOutputError: when the refined outputs are missing (the bundle's config runs
            without refinement) or are not on the source grid.
    """
    missing = [k for k in ("refined_mask", "refined_prob") if d.get(k) is None]
    if missing:
        raise PipelineOutputError(
            f"the bundle's pipeline gave no {', '.join(missing)}: the app writes the refined product; "
            "run it with the refinement on (configs/inference.json#refine true)"
        )
    out = {
        "refined_mask": (_plane(d["refined_mask"]) > 0.5).astype(np.uint8),
        "refined_prob": np.clip(np.nan_to_num(_plane(d["refined_prob"])), 0.0, 1.0).astype(np.float32),
    }
    if d.get("mask") is not None:
        out["mask"] = (_plane(d["mask"]) > 0.5).astype(np.uint8)
    if d.get("virtual_normal") is not None:
        out["virtual_normal"] = _plane(d["virtual_normal"]).astype(np.float32)
    for k, v in out.items():
        if v.shape != tuple(shape):
            raise PipelineOutputError(f"{k} has shape {v.shape}, not the source grid {tuple(shape)}")
    return out


def input_problem(exc: BaseException) -> str | None:
    """The problem text of a ``bundle.data.MammogramError`` in ``exc``'s cause chain, else None.

    MONAI's ``Compose`` wraps transform errors, so the chain is searched.

    Args:
        exc: the exception raised by the pipeline.
    """
    from bundle.data import MammogramError

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, MammogramError):
            return str(getattr(e, "problem", e))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def run_case(runner: Any, case: MGCase) -> None:
    """Run the bundle's pipeline on one pending case and keep its results in the case.

    A ``MammogramError`` (bad input, e.g. no breast found) skips the case; anything else fails
    it. Either way the reason is logged and recorded; the next case goes on.

    Args:
        runner: the bundle's runner (``runner.predict(path)``).
        case: a ``pending`` case with ``dataset`` and ``source_path``.
    """
    if case.status != STATUS_PENDING:
        return
    ds = case.dataset
    path, tmp = case.source_path, None
    try:
        if not path or not os.path.isfile(path):  # not from a file: hand the pipeline a temporary copy
            fd, tmp = tempfile.mkstemp(suffix=".dcm")
            os.close(fd)
            ds.save_as(tmp, enforce_file_format=True)
            path = tmp
        d = runner.predict(path)
        arrays = result_arrays(d, (int(ds.Rows), int(ds.Columns)))
    except Exception as e:
        problem = input_problem(e)
        if problem is not None:
            case.skip(problem)
            logger.warning("skipped %s (series %s): %s", case.sop_uid, case.series_uid, problem)
        else:
            case.fail(f"{type(e).__name__}: {e}")
            logger.exception("the pipeline failed on %s (%s)", case.sop_uid, case.source_path)
        return
    finally:
        if tmp:
            os.remove(tmp)
    case.mask, case.prob = arrays["refined_mask"], arrays["refined_prob"]
    case.virtual_normal = arrays.get("virtual_normal")
    case.mask_pixels = int(case.mask.sum())
    if "mask" in arrays:
        case.segai_mask_pixels = int(arrays["mask"].sum())
    case.status = STATUS_OK
    logger.info("inferred %s: %d refined MC pixels (SegAI mask %s)", case.sop_uid, case.mask_pixels,
                case.segai_mask_pixels)
