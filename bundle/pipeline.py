"""The two-stage pipeline (inference layer): SegAI, then one refiner, on one image.

:class:`MCPipeline` is the only place where SegAI and a refinement run: the batch runner
(:class:`bundle.engine.MammogramInference`), the study (:class:`bundle.study.MCStudy`), the
benchmark and tuning scripts and the MONAI Deploy operator all call it. It works on the
working grid (after the preprocessing chain, before the geometry is restored) and returns
named maps:

- ``prob``: SegAI's probability, float32 in [0, 1];
- ``mask``: ``prob >= threshold`` (the high-sensitivity map, the refinement's hole);
- ``refined_prob``, ``refined_mask``, ``virtual_normal`` when a refiner is set (the refined
  mask is ``refined_prob >= refined_threshold`` or, with ``false_alarm``, that control's mask,
  grown into the connected pixels with ``refined_prob >= grow_threshold`` or SegAI's
  ``prob >= segai_grow_threshold`` when those are set,
  less the marks larger than ``max_mark_diameter_mm``),
  plus whatever else the refiner returns (e.g. ``hole``);
- ``extras``: per-image operating points (``hole_threshold_image``,
  ``refined_threshold_image``) for the summary row.

It imports only lower layers (networks are passed in, refiners are callables), never the
evaluation layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from bundle.clusters import drop_large_marks, grow_marks
from bundle.utils import as_2d

__all__ = ["MCPipeline", "PipelineInferer"]

ArrayLike = Any


def _np2d(x: ArrayLike | None, dtype: Any = np.float32) -> np.ndarray | None:
    """``x`` as a 2-D numpy array (:func:`bundle.utils.as_2d`), or None."""
    return None if x is None else as_2d(x, "map", dtype)


class MCPipeline:
    """SegAI (a tiled inferer over a network) followed by an optional refiner.

    Args:
        network: the SegAI network, already holding its weights.
        inferer: callable ``inferer(x (1, 1, H, W), network, breast=(1, 1, H, W))`` returning
            the probability map, e.g. :class:`bundle.inferers.BreastTileInferer`.
        refiner: optional callable ``(image (H, W), segai_prob (H, W) | None, breast (H, W) |
            None) -> dict`` with ``prob`` and optionally ``virtual_normal`` (see
            :mod:`bundle.refine`); None gives SegAI's maps only.
        threshold: threshold of SegAI's mask.
        refined_threshold: threshold of the refined mask (when ``false_alarm`` is None).
        hole_control: optional per-image operating point of the refinement's hole, applied to
            SegAI's probability (e.g. :class:`bundle.falsealarm.FalseAlarmControl`): a callable
            ``(prob (H, W), breast) -> {"mask", "threshold", ...}``; the refiner then sees
            SegAI's map only inside the marks it keeps.
        false_alarm: optional per-image operating point of the refined mask (same kind of
            callable, applied to the refined probability); replaces ``refined_threshold``.
        max_mark_diameter_mm: optional size limit of the refined mask's marks: a mark larger
            than a disk of this diameter is removed (:func:`bundle.clusters.drop_large_marks`:
            not a microcalcification). None keeps every mark.
        spacing_mm: pixel spacing of the working grid in mm (for ``max_mark_diameter_mm``).
        grow_threshold: optional lower threshold of the refined map into which each mark of the
            refined mask grows (:func:`bundle.clusters.grow_marks`, hysteresis): it restores the
            rim of a kept MC, where the difference to the virtual normal is weaker than at its
            core, and adds no mark. None (or a value >= the refined threshold) grows nothing.
        segai_grow_threshold: optional SegAI probability into which each mark of the refined mask
            grows (the same hysteresis on SegAI's own map, not the hole-controlled one): SegAI's
            outline of an MC whose core the refinement kept. None grows nothing.
        device: device of the network.
        uses_segai: whether the refiner needs SegAI's map; None reads the refiner's ``needs``
            attribute (default: it does).
    """

    def __init__(
        self,
        network: torch.nn.Module | None,
        inferer: Callable[..., torch.Tensor] | None,
        refiner: Callable[..., Mapping[str, Any]] | None = None,
        threshold: float = 0.05,
        refined_threshold: float = 0.6,
        hole_control: Callable[..., Mapping[str, Any]] | None = None,
        false_alarm: Callable[..., Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        uses_segai: bool | None = None,
        max_mark_diameter_mm: float | None = None,
        spacing_mm: float = 0.07,
        grow_threshold: float | None = None,
        segai_grow_threshold: float | None = None,
    ) -> None:
        self.network = network
        self.inferer = inferer
        self.refiner = refiner
        self.threshold = float(threshold)
        self.refined_threshold = float(refined_threshold)
        self.hole_control = hole_control
        self.false_alarm = false_alarm
        self.device = torch.device(device)
        self.uses_segai = uses_segai
        if max_mark_diameter_mm is not None and (max_mark_diameter_mm <= 0 or spacing_mm <= 0):
            raise ValueError(f"max_mark_diameter_mm and spacing_mm must be > 0, got {max_mark_diameter_mm}, {spacing_mm}")
        self.max_mark_diameter_mm = None if max_mark_diameter_mm is None else float(max_mark_diameter_mm)
        self.spacing_mm = float(spacing_mm)
        for name, value in (("grow_threshold", grow_threshold), ("segai_grow_threshold", segai_grow_threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] or None, got {value}")
        self.grow_threshold = None if grow_threshold is None else float(grow_threshold)
        self.segai_grow_threshold = None if segai_grow_threshold is None else float(segai_grow_threshold)

    # ------------------------------------------------------------------ stage 1
    @torch.no_grad()
    def segai(self, image: ArrayLike, breast: ArrayLike | None = None) -> np.ndarray:
        """SegAI's probability map of one image.

        Args:
            image: ``(H, W)`` or ``(1, H, W)`` normalised image (numpy or torch).
            breast: optional breast mask of the same shape.

        Returns:
            float32 ``(H, W)`` in [0, 1] (non-finite outputs become 0).
        """
        if self.network is None or self.inferer is None:
            raise RuntimeError("MCPipeline.segai: no SegAI network/inferer was given")
        img = _np2d(image)
        x = torch.as_tensor(img)[None, None].to(self.device)
        b = None if breast is None else torch.as_tensor(_np2d(breast) > 0, dtype=torch.float32)[None, None].to(self.device)
        self.network.eval()
        out = self.inferer(x, self.network, breast=b)
        return _unit_map(out[0, 0].detach().float().cpu().numpy())

    # ------------------------------------------------------------------ stage 2
    def refine(
        self,
        image: ArrayLike,
        prob: ArrayLike | None,
        breast: ArrayLike | None = None,
        refiner: Callable[..., Mapping[str, Any]] | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        """Run the refiner on SegAI's map of one image.

        Args:
            image: ``(H, W)`` normalised image.
            prob: SegAI's ``(H, W)`` probability (None for refiners that do not use it).
            breast: optional breast mask.
            refiner: a refiner to use instead of the pipeline's own (the study runs several
                on one SegAI map).
            threshold: refined-mask threshold instead of ``refined_threshold``.

        Returns:
            ``refined_prob`` (float32 in [0, 1]), ``refined_mask`` (bool), ``virtual_normal``
            when the refiner gives one, the refiner's other outputs and ``extras``.
        """
        ref = refiner if refiner is not None else self.refiner
        if ref is None:
            raise RuntimeError("MCPipeline.refine: no refiner")
        img = _np2d(image)
        b = None if breast is None else _np2d(breast) > 0
        seg = seg_full = _np2d(prob)
        extras: dict[str, Any] = {}
        if seg is not None and self.hole_control is not None and refiner is None:
            hc = self.hole_control(seg, b)
            kept = hc.get("indices")
            if kept is None:
                seg = seg * np.asarray(hc["mask"], dtype=seg.dtype)
            else:  # sparse: only the kept candidates' pixels are copied (np.zeros is allocated lazily)
                masked = np.zeros(seg.shape, dtype=seg.dtype)
                masked.ravel()[kept] = seg.ravel()[kept]
                seg = masked
            extras["hole_threshold_image"] = round(float(hc["threshold"]), 6)
        out = dict(ref(img, seg, b))
        rp = _unit_map(_np2d(out.pop("prob")))
        if rp.shape != img.shape:
            raise ValueError(f"refined map shape {rp.shape} differs from the image {img.shape}")
        if self.false_alarm is not None and refiner is None and threshold is None:
            fa = self.false_alarm(rp, b)
            rm = np.asarray(fa["mask"], dtype=bool)
            extras["refined_threshold_image"] = round(float(fa["threshold"]), 6)
        else:
            rm = rp >= (self.refined_threshold if threshold is None else float(threshold))
        if refiner is None and threshold is None:
            rm = self._grow(rm, rp, seg_full)
        if self.max_mark_diameter_mm is not None and refiner is None:
            rm = drop_large_marks(rm, self.max_mark_diameter_mm, self.spacing_mm)
        res: dict[str, Any] = {k: v for k, v in out.items() if k != "virtual_normal"}
        res.update(refined_prob=rp, refined_mask=rm, extras=extras)
        if out.get("virtual_normal") is not None:
            res["virtual_normal"] = _np2d(out["virtual_normal"])
        return res

    def _grow(self, marks: np.ndarray, refined: np.ndarray, prob: np.ndarray | None) -> np.ndarray:
        """``marks`` grown into the refined map's and SegAI's looser pixels (the thresholds that are set)."""
        support = None
        if self.grow_threshold is not None:
            support = refined >= self.grow_threshold
        if self.segai_grow_threshold is not None and prob is not None:
            s = prob >= self.segai_grow_threshold
            support = s if support is None else support | s
        return marks if support is None else grow_marks(marks, support)

    def needs_segai(self, refiner: Any | None = None) -> bool:
        """Whether ``refiner`` (default: the pipeline's) uses SegAI's map.

        Args:
            refiner: a refiner; its ``needs`` attribute (a tuple of ``"segai"`` /
                ``"inpainter"``) is read when present.
        """
        ref = refiner if refiner is not None else self.refiner
        if refiner is None and self.uses_segai is not None:
            return self.uses_segai
        needs = getattr(ref, "needs", None)
        return True if needs is None else "segai" in needs

    # ------------------------------------------------------------------ both
    def __call__(self, image: ArrayLike, breast: ArrayLike | None = None) -> dict[str, Any]:
        """Both stages on one image on the working grid.

        Args:
            image: ``(H, W)`` or ``(1, H, W)`` normalised image.
            breast: optional breast mask.

        Returns:
            ``prob``, ``mask`` and, with a refiner, ``refined_prob``, ``refined_mask``,
            ``virtual_normal`` (numpy ``(H, W)``), plus ``extras`` (per-image operating points).
        """
        img = _np2d(image)
        b = None if breast is None else _np2d(breast) > 0
        maps: dict[str, Any] = {"extras": {}}
        if self.network is not None and (self.refiner is None or self.needs_segai()):
            p = self.segai(img, b)
            maps["prob"] = p
            maps["mask"] = p >= self.threshold
        if self.refiner is not None:
            r = self.refine(img, maps.get("prob"), b)
            maps["extras"].update(r.pop("extras"))
            maps.update(r)
        return maps


def _unit_map(p: np.ndarray) -> np.ndarray:
    """``p`` as float32 in [0, 1], non-finite values made 0 (NaN, -inf) or 1 (+inf).

    A map that already is float32, finite and in [0, 1] (the usual case) is returned as it is:
    two reductions instead of four full-image passes and copies.
    """
    if p.dtype == np.float32 and p.size:
        lo, hi = float(p.min()), float(p.max())  # NaN propagates and fails both tests
        if lo >= 0.0 and hi <= 1.0:
            return p
    return np.clip(np.nan_to_num(p, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)


class PipelineInferer:
    """:class:`MCPipeline` as a MONAI-style inferer, so an ignite evaluator (MONAI Label, the
    MONAI Deploy bundle operator, ``configs/inference.json#evaluator``) runs the same two stages.

    Called as ``inferer(images (B, 1, H, W), network, breast=(B, 1, H, W))`` (``network`` is
    ignored: the pipeline holds SegAI's network); returns ``(B, len(keys), H, W)`` with the
    pipeline's maps in the order of ``keys`` (a map the pipeline does not make is zeros).

    Args:
        pipeline: the two-stage pipeline.
        keys: maps to return, as channels.
    """

    def __init__(self, pipeline: MCPipeline, keys: tuple[str, ...] = ("refined_prob", "prob", "virtual_normal")) -> None:
        self.pipeline = pipeline
        self.keys = tuple(keys)

    def __call__(self, inputs: torch.Tensor, network: Any = None, *args: Any, breast: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        outs = []
        for i in range(x.shape[0]):
            b = None if breast is None else breast[i]
            maps = self.pipeline(x[i], b)
            chans = [np.zeros(x.shape[-2:], np.float32) if maps.get(k) is None else np.asarray(maps[k], np.float32) for k in self.keys]
            outs.append(torch.as_tensor(np.stack(chans)))
        return torch.stack(outs).to(x.device)
