"""Intensity normalisation and the preprocessing chain used by the configs.

:class:`NormalizeMammogramd` maps breast intensity percentiles to 0 and 1;
:func:`mammogram_preprocessing` composes load -> (label) -> orient -> resample -> breast mask ->
normalise.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, MapTransform

from bundle.breastmask import BreastMaskd
from bundle.geometry import OrientBreastd, ResampleToSpacingd
from bundle.imagemeta import _as_tensor, _meta_of, _meta_tensor, _path_of
from bundle.loading import LoadINbreastLabeld, LoadMammogramd
from bundle.readers import MammogramError, _check_nan_policy, _handle_non_finite

__all__ = ["NormalizeMammogramd", "mammogram_preprocessing"]


# ----------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------


class NormalizeMammogramd(MapTransform):
    """Map breast intensity percentiles ``lower`` -> 0 and ``upper`` -> 1 (linear, not clipped).

    Records ``norm_lower``/``norm_upper`` (the raw values mapped to 0 and 1) in the meta data so the
    raw scale can be recovered as ``x * (upper - lower) + lower``.

    Args:
        keys: image keys.
        breast_key: breast mask key; ``None`` uses the whole image.
        lower: lower percentile (0-100).
        upper: upper percentile (0-100).
        nan_policy: ``"raise"`` -> ``MammogramError("image contains NaN/inf")``; ``"fill"`` ->
            replace NaN/-inf by the minimum and +inf by the maximum finite value, with a warning.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        breast_key: str | None = "breast",
        lower: float = 1.0,
        upper: float = 99.0,
        nan_policy: str = "raise",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.breast_key = breast_key
        self.lower = float(lower)
        self.upper = float(upper)
        self.nan_policy = _check_nan_policy(nan_policy)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise the keys."""
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            meta = _meta_of(x)
            path = _path_of(meta) or str(key)
            arr = _as_tensor(x).detach().cpu().float().numpy()
            arr = _handle_non_finite(arr, path, self.nan_policy)
            if self.breast_key is None:
                sel = np.ones(arr.shape, bool)
            else:
                b = _as_tensor(d[self.breast_key]).detach().cpu().numpy() > 0
                if b.shape[-2:] != arr.shape[-2:]:
                    raise ValueError(f"breast mask shape {b.shape} does not match image shape {arr.shape}")
                sel = np.broadcast_to(b, arr.shape)
            vals = arr[sel]
            if vals.size == 0:
                raise MammogramError(path, "empty breast mask")
            step = max(1, vals.size // 4_000_000)
            lo, hi = (float(v) for v in np.percentile(vals[::step], [self.lower, self.upper]))
            if not hi - lo > 1e-6 * max(1.0, abs(hi)):
                raise MammogramError(path, "no contrast inside the breast (flat image)")
            out = ((arr - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
            meta.update({"norm_lower": lo, "norm_upper": hi, "norm_percentiles": (self.lower, self.upper)})
            affine = x.affine if isinstance(x, MetaTensor) else None
            d[key] = _meta_tensor(torch.from_numpy(out), affine, meta)
        return d


# ----------------------------------------------------------------------------------------------
# the preprocessing chain used by the configs
# ----------------------------------------------------------------------------------------------


def mammogram_preprocessing(
    spacing_override: float | Sequence[float] | None = None,
    working_spacing: float = 0.07,
    image_key: str = "image",
    label_key: str | None = None,
    breast_key: str = "breast",
    apply_voi: bool = False,
    allowed_modalities: Sequence[str] | None = ("MG",),
    min_size: int = 64,
    orient_method: str = "laterality",
    exclude_pectoral: bool = False,
    lower: float = 1.0,
    upper: float = 99.0,
    nan_policy: str = "raise",
    point_radius: int = 0,
) -> Compose:
    """Load -> (label) -> Orient -> Resample -> BreastMask -> Normalize -> EnsureTyped.

    Args:
        spacing_override: pixel spacing in mm that wins over the files' (needed for PNG/TIFF).
        working_spacing: working pixel spacing in mm.
        image_key: image key (a file path before, a MetaTensor after).
        label_key: optional label key (INbreast XML, mask file or None), resampled by nearest.
        breast_key: key for the breast mask.
        apply_voi: apply the DICOM VOI LUT / window.
        allowed_modalities: accepted DICOM modalities.
        min_size: minimum pixels per side.
        orient_method: ``"laterality"`` or ``"intensity"``.
        exclude_pectoral: remove the pectoral muscle from the breast mask in MLO views.
        lower: lower breast percentile mapped to 0.
        upper: upper breast percentile mapped to 1.
        nan_policy: ``"raise"`` or ``"fill"``.
        point_radius: disc radius for single-point INbreast calcifications.
    """
    geo_keys = [image_key] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    transforms: list[Any] = [
        LoadMammogramd(
            image_key,
            spacing=spacing_override,
            apply_voi=apply_voi,
            allowed_modalities=allowed_modalities,
            min_size=min_size,
            nan_policy=nan_policy,
        )
    ]
    if label_key:
        transforms.append(LoadINbreastLabeld(label_key, image_key=image_key, point_radius=point_radius))
    transforms += [
        OrientBreastd(geo_keys, ref_key=image_key, method=orient_method),
        ResampleToSpacingd(geo_keys, spacing=working_spacing, mode=modes, ref_key=image_key),
        BreastMaskd(image_key, out_key=breast_key, exclude_pectoral=exclude_pectoral),
        NormalizeMammogramd(image_key, breast_key=breast_key, lower=lower, upper=upper, nan_policy=nan_policy),
        EnsureTyped(geo_keys + [breast_key], track_meta=True),
    ]
    return Compose(transforms)
