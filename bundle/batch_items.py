"""Reading the items of an ignite engine's output and batch: decollation, key lookup, plain python
values and the meta data a metric needs (case name, pixel spacing of the prediction's grid).

Shared by the per-image handlers (:mod:`bundle.metric_handlers`) and the evaluation report
(:mod:`bundle.evaluation_report`). Decollation is MONAI's ``Decollated``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.image_metrics import _spacing_pair


# ----------------------------------------------------------------------------------------------
# batch / meta helpers for the handlers
# ----------------------------------------------------------------------------------------------
def _decollate(data: Any) -> list[Any] | None:
    """Split a collated batch (dict of batched tensors, or batched tensor) into a list of items."""
    if data is None:
        return None
    if isinstance(data, (list, tuple)):
        return list(data)
    from monai.transforms import Decollated

    # like MONAI workflows: scalars are replicated, MetaTensor meta data is split per item
    return list(Decollated(keys=None, detach=True)(data))


def _get(item: Any, key: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(key)
    return None


def _py(v: Any) -> Any:
    """Plain python value from tensors / numpy values (meta data after decollation)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    return v


def _meta_of(item: Any, keys: Iterable[str]) -> dict[str, Any]:
    """Meta data of the first key in ``keys`` that carries any (MetaTensor ``.meta`` or ``<key>_meta_dict``)."""
    for key in keys:
        value = _get(item, key)
        meta = getattr(value, "meta", None)
        if isinstance(meta, Mapping) and meta:
            return dict(meta)
        meta = _get(item, f"{key}_meta_dict")
        if isinstance(meta, Mapping) and meta:
            return dict(meta)
    return {}


def _shape_eq(value: Any, shape: tuple[int, int]) -> bool:
    try:
        return [int(x) for x in _py(value)][-2:] == list(shape)
    except (TypeError, ValueError):
        return False


def _spacing_from_meta(meta: Mapping[str, Any], shape: tuple[int, int]) -> tuple[float, float] | None:
    """Pick the spacing that belongs to the grid of ``shape`` (working grid or source grid)."""
    working, source = meta.get("working_spacing"), meta.get("spacing")
    candidates = []
    if working is not None and _shape_eq(meta.get("working_shape"), shape):
        candidates.append(working)
    if source is not None and _shape_eq(meta.get("original_shape"), shape):
        candidates.append(source)
    candidates += [v for v in (working, source) if v is not None]
    pixdim = meta.get("pixdim")
    if pixdim is not None:
        pd = _py(pixdim)
        if isinstance(pd, list) and len(pd) >= 3:
            candidates.append(pd[1:3])
    for cand in candidates:
        try:
            return _spacing_pair(_py(cand))
        except (TypeError, ValueError):
            continue
    return None


def _case_name(meta: Mapping[str, Any], index: int) -> tuple[str, str]:
    filename = _py(meta.get("filename_or_obj", "")) or ""
    filename = str(filename)
    stem = _py(meta.get("stem"))
    if not stem and filename:
        stem = Path(filename).name.split(".")[0]
    return (str(stem) if stem else f"case_{index:04d}"), filename
