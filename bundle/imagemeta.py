"""Helpers shared by the data transforms for images held as ``monai.data.MetaTensor``.

Plain tensors and meta dicts out of MetaTensors, MetaTensors with their own copy of the meta data,
affines composed with 2-D index transforms, and the reference meta data of a data dict.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__: list[str] = []


def _as_tensor(x: Any) -> torch.Tensor:
    """A plain torch tensor (no meta) from a MetaTensor, tensor or array."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _meta_of(x: Any) -> dict:
    return dict(x.meta) if isinstance(x, MetaTensor) else {}


def _meta_tensor(t: torch.Tensor, affine: Any, meta: Mapping) -> MetaTensor:
    """A MetaTensor with its own copy of ``meta`` (MetaTensor keeps the dict it is given) and ``affine``."""
    m = {k: v for k, v in meta.items() if k != "affine"}
    return MetaTensor(t, affine=affine, meta=m)


def _affine_with(affine: torch.Tensor | None, mat: np.ndarray) -> torch.Tensor:
    """``affine @ mat`` where ``mat`` is a 3x3 (row, col, 1) index transform; any affine size."""
    if affine is None:
        affine = torch.eye(3, dtype=torch.float64)
    a = torch.as_tensor(affine, dtype=torch.float64)
    n = a.shape[-1]
    m = torch.eye(n, dtype=torch.float64)
    m[:2, :2] = torch.as_tensor(mat[:2, :2])
    m[:2, n - 1] = torch.as_tensor(mat[:2, 2])
    return a @ m


def _ref_meta(d: Mapping, ref_key: Hashable) -> dict:
    """Meta data of ``d[ref_key]`` (a MetaTensor or a plain dict), or ``d[f"{ref_key}_meta_dict"]``."""
    ref = d.get(ref_key)
    if isinstance(ref, MetaTensor):
        return dict(ref.meta)
    if isinstance(ref, Mapping):
        return dict(ref)
    alt = d.get(f"{ref_key}_meta_dict")
    if isinstance(alt, Mapping):
        return dict(alt)
    raise KeyError(f"no meta data found for reference key {ref_key!r}")


def _path_of(meta: Mapping) -> str:
    return str(meta.get("filename_or_obj", ""))
