"""Stage-2 refinement of the SegAI microcalcification map, and its baselines.

All public functions take 2-D ``(H, W)`` arrays, either numpy arrays or torch tensors
(a leading singleton channel, ``(1, H, W)``, is squeezed), and return numpy ``float32``
arrays (masks: numpy ``bool``). ``image`` is the normalised mammogram (breast tissue about
[0, 1], calcifications bright), ``segai_prob`` the SegAI probability map in [0, 1] and
``breast`` an optional breast mask (non-zero = breast).

Methods (names of :data:`REFINERS`):

- ``"segai"``: the SegAI map unchanged.
- ``"sp1"`` / ``"sp2"``: signal-processing maps, Gaussian blur difference (GBD) and white
  top-hat transform (THT).
- ``"segai+sp1"`` / ``"segai+sp2"``: SegAI+R:SP, the SP map weighted by a local average
  pooling of the SegAI map (seed Eq. 2).
- ``"segai+genai"``: SegAI+R:GenAI, the proposed method (seed Eq. 3): binarise SegAI, blank
  those pixels, inpaint virtual normal tissue with the transformer, normalised
  ``image - virtual`` is the refined map.
- ``"segai+classical"``: the same with biharmonic inpainting instead of the network.
- ``"grid_genai"``: the Table-2 baseline: no SegAI mask, grid rectangles blanked over the
  whole image.

See ``docs/refinement.md`` for the equations and the normalisation.

This module (inference layer, ``docs/architecture.md``) holds the refiners with the common
signature and their registry; the maps themselves are plain functions in
:mod:`bundle.refine_maps`, re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from bundle.refine_maps import (
    ArrayLike2D,
    InpaintFn,
    breast_mask_2d,
    classical_inpaint_fn,
    difference_scale,
    genai_refine,
    grid_mask_refine,
    network_inpaint_fn,
    sp1_gaussian_blur_difference,
    sp2_white_tophat,
    sp_refine_with_segai,
    to_2d,
)

__all__ = [
    "InpaintFn",
    "Refiner",
    "REFINERS",
    "RefinerSpec",
    "register_refiner",
    "refiner_spec",
    "method_label",
    "method_needs",
    "build_refiner",
    "refiner_arguments",
    "sp1_gaussian_blur_difference",
    "sp2_white_tophat",
    "sp_refine_with_segai",
    "difference_scale",
    "genai_refine",
    "grid_mask_refine",
    "classical_inpaint_fn",
    "network_inpaint_fn",
    "SegAIRefiner",
    "SPRefiner",
    "GenAIRefiner",
    "GridGenAIRefiner",
]


class Refiner(Protocol):
    """Common signature of a refinement method."""

    def __call__(
        self, image: ArrayLike2D, segai_prob: ArrayLike2D | None, breast: ArrayLike2D | None = None
    ) -> dict[str, np.ndarray]:
        """Return at least ``{"prob": (H, W) float32 in [0, 1]}``."""
        ...


# --------------------------------------------------------------------------------------
# refiners with a common signature, and their registry
# --------------------------------------------------------------------------------------
class SegAIRefiner:
    """``"segai"``: the SegAI map itself (0 outside ``breast`` when given)."""

    def __call__(
        self, image: ArrayLike2D, segai_prob: ArrayLike2D | None, breast: ArrayLike2D | None = None
    ) -> dict[str, np.ndarray]:
        if segai_prob is None:
            raise ValueError("The 'segai' method needs segai_prob.")
        prob = np.clip(np.nan_to_num(to_2d(segai_prob, "segai_prob"), nan=0.0), 0.0, 1.0).astype(np.float32)
        b = breast_mask_2d(breast, prob.shape)
        if b is not None:
            prob = np.where(b, prob, 0.0).astype(np.float32)
        return {"prob": prob}


class SPRefiner:
    """``"sp1"``, ``"sp2"``, ``"segai+sp1"``, ``"segai+sp2"``.

    Args:
        method: ``"sp1"`` (GBD) or ``"sp2"`` (THT).
        use_segai: weight the SP map by pooled SegAI (:func:`sp_refine_with_segai`).
        pool_size: pooling window for ``use_segai``.
        stride: pooling stride for ``use_segai``.
        segai_threshold: SegAI values below this are set to 0 before pooling (SegAI at its
            operating point, as the hole of SegAI+R:GenAI); 0 keeps the raw map.
        sp_kwargs: extra arguments of the SP function (sigmas, radius, percentile).
    """

    def __init__(
        self,
        method: str = "sp1",
        use_segai: bool = False,
        pool_size: int = 9,
        stride: int = 1,
        segai_threshold: float = 0.0,
        **sp_kwargs: Any,
    ) -> None:
        funcs = {"sp1": sp1_gaussian_blur_difference, "sp2": sp2_white_tophat}
        if method not in funcs:
            raise ValueError(f"Unknown SP method {method!r}; use one of {sorted(funcs)}.")
        self.fn = partial(funcs[method], **sp_kwargs)
        self.use_segai, self.pool_size, self.stride = use_segai, pool_size, stride
        self.segai_threshold = float(segai_threshold)

    def __call__(
        self, image: ArrayLike2D, segai_prob: ArrayLike2D | None, breast: ArrayLike2D | None = None
    ) -> dict[str, np.ndarray]:
        sp = self.fn(image, breast=breast)
        if not self.use_segai:
            return {"prob": sp}
        if segai_prob is None:
            raise ValueError("SegAI+R:SP needs segai_prob.")
        seg = to_2d(segai_prob, "segai_prob")
        if self.segai_threshold > 0:
            seg = np.where(seg >= self.segai_threshold, seg, 0.0).astype(np.float32)
        return {"prob": sp_refine_with_segai(sp, seg, self.pool_size, self.stride), "sp": sp}


def _resolve_inpaint_fn(
    inpaint_fn: InpaintFn | None, net: torch.nn.Module | None, **net_kwargs: Any
) -> InpaintFn:
    if inpaint_fn is not None:
        return inpaint_fn
    if net is None:
        raise ValueError("Give either inpaint_fn or net.")
    return network_inpaint_fn(net, **net_kwargs)


class GenAIRefiner:
    """``"segai+genai"`` (with ``net``) and ``"segai+classical"`` (with a classical
    ``inpaint_fn``): :func:`genai_refine` behind the common signature.

    Args:
        inpaint_fn: an :data:`InpaintFn`; if None, ``net`` is wrapped by
            :func:`network_inpaint_fn`.
        net: trained inpainter, used when ``inpaint_fn`` is None.
        tile: tile side for ``net``.
        overlap: tile overlap for ``net``.
        batch_size: tiles per call for ``net``.
        device: device of ``net``.
        mode: ``"tiles"`` or ``"crops"`` for ``net``, see :func:`network_inpaint_fn`.
        crop_sizes: crop sides of ``"crops"``.
        context: known pixels around each crop's interior in ``"crops"``.
        kwargs: passed to :func:`genai_refine` (threshold, dilation_px, scale, signed,
            k_sigma).
    """

    def __init__(
        self,
        inpaint_fn: InpaintFn | None = None,
        net: torch.nn.Module | None = None,
        tile: int = 128,
        overlap: float = 0.25,
        batch_size: int = 8,
        device: str = "cpu",
        mode: str = "tiles",
        crop_sizes: Sequence[int] = (32, 64),
        context: int = 8,
        **kwargs: Any,
    ) -> None:
        self.inpaint_fn = _resolve_inpaint_fn(
            inpaint_fn, net, tile=tile, overlap=overlap, batch_size=batch_size, device=device, mode=mode,
            crop_sizes=tuple(crop_sizes), context=context,
        )
        self.kwargs = kwargs

    def __call__(
        self, image: ArrayLike2D, segai_prob: ArrayLike2D | None, breast: ArrayLike2D | None = None
    ) -> dict[str, np.ndarray]:
        if segai_prob is None:
            raise ValueError("SegAI+R:GenAI needs segai_prob.")
        return genai_refine(image, segai_prob, self.inpaint_fn, breast=breast, **self.kwargs)


class GridGenAIRefiner(GenAIRefiner):
    """``"grid_genai"``: :func:`grid_mask_refine`; ``segai_prob`` is ignored.

    Args: as :class:`GenAIRefiner`; ``kwargs`` go to :func:`grid_mask_refine` (grid,
    context, scale, signed, k_sigma, skip_outside_breast).
    """

    def __call__(
        self, image: ArrayLike2D, segai_prob: ArrayLike2D | None = None, breast: ArrayLike2D | None = None
    ) -> dict[str, np.ndarray]:
        return grid_mask_refine(image, self.inpaint_fn, breast=breast, **self.kwargs)


@dataclass(frozen=True)
class RefinerSpec:
    """What a refinement method says about itself; one entry of :data:`REFINERS`.

    Calling the spec builds the refiner (``defaults`` overridden by the call's keyword
    arguments) and stamps ``name``, ``label``, ``needs`` and ``operating_point`` on it, so the
    pipeline, the study and the reports read them from the refiner itself.

    Args:
        name: registry name, used in configs (``refiner_name``) and the study's ``methods``.
        factory: class or callable returning the refiner.
        label: name in tables and figures (the papers' notation).
        needs: what it needs besides the image: ``"segai"`` (SegAI's map) and/or
            ``"inpainter"`` (inpainter weights, passed as ``net``).
        defaults: keyword arguments of ``factory`` used unless the caller gives them.
        operating_point: threshold of its refined mask unless a config says otherwise.
        description: one line for ``docs/`` and ``--help`` listings.
    """

    name: str
    factory: Callable[..., Any]
    label: str
    needs: tuple[str, ...] = ("segai",)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    operating_point: float = 0.5
    description: str = ""

    def __call__(self, **kwargs: Any) -> Refiner:
        kw = {**dict(self.defaults), **kwargs}
        ref = self.factory(**kw)
        try:
            for attr in ("name", "label", "needs", "operating_point"):
                setattr(ref, attr, getattr(self, attr))
        except (AttributeError, TypeError):  # e.g. a bound method: wrap it so it still describes itself
            ref = _DescribedRefiner(ref, self)
        return ref


class _DescribedRefiner:
    """A refiner that cannot carry attributes (a bound method), with its spec's description.

    Args:
        fn: the refiner callable.
        spec: its registry entry.
    """

    def __init__(self, fn: Callable[..., Any], spec: RefinerSpec) -> None:
        self.fn = fn
        self.name, self.label, self.needs, self.operating_point = spec.name, spec.label, spec.needs, spec.operating_point

    def __call__(self, image: Any, segai_prob: Any = None, breast: Any = None) -> Any:
        return self.fn(image, segai_prob, breast)


#: name -> :class:`RefinerSpec`. A method registers itself where it is defined with
#: :func:`register_refiner` (MC-GenRef's two rows register in :mod:`bundle.mcgenref`);
#: ``build_refiner(name, **kwargs)`` builds it.
REFINERS: dict[str, RefinerSpec] = {}


def register_refiner(
    name: str,
    factory: Callable[..., Any] | None = None,
    *,
    label: str | None = None,
    needs: Sequence[str] = ("segai",),
    defaults: Mapping[str, Any] | None = None,
    operating_point: float = 0.5,
    description: str = "",
    overwrite: bool = False,
) -> Any:
    """Register a refinement method; usable as a call or as a class decorator.

    ``register_refiner("mine", MyRefiner, label="SegAI+R:Mine")`` or ``@register_refiner("mine",
    label=...)`` above the class.

    Args:
        name: registry name.
        factory: class or callable returning the refiner; omitted when used as a decorator.
        label: table label (default: ``name``).
        needs: ``"segai"`` and/or ``"inpainter"``.
        defaults: default keyword arguments of ``factory``.
        operating_point: default threshold of its refined mask.
        description: one line describing it.
        overwrite: allow replacing an existing name.

    Returns:
        the factory (so the decorator leaves the class unchanged).
    """
    bad = set(needs) - {"segai", "inpainter"}
    if bad:
        raise ValueError(f"refiner {name!r}: unknown needs {sorted(bad)}; use 'segai' and/or 'inpainter'")

    def _register(f: Callable[..., Any]) -> Callable[..., Any]:
        if name in REFINERS and not overwrite:
            raise KeyError(f"Refiner {name!r} already exists.")
        REFINERS[name] = RefinerSpec(
            name, f, label or name, tuple(needs), dict(defaults or {}), float(operating_point), description
        )
        return f

    return _register if factory is None else _register(factory)


def refiner_spec(name: str) -> RefinerSpec:
    """The :class:`RefinerSpec` of ``name`` (``KeyError`` naming the known ones)."""
    if name not in REFINERS:
        raise KeyError(f"Unknown refiner {name!r}; known: {sorted(REFINERS)}.")
    return REFINERS[name]


def method_label(name: str) -> str:
    """Table label of a method (its name when it is not registered)."""
    spec = REFINERS.get(name)
    return spec.label if spec is not None else name


def method_needs(name: str) -> tuple[str, ...]:
    """What a method needs (``("segai",)`` when it is not registered)."""
    spec = REFINERS.get(name)
    return spec.needs if spec is not None else ("segai",)


def build_refiner(name: str, **kwargs: Any) -> Refiner:
    """Instantiate the refinement method ``name`` of :data:`REFINERS`.

    Args:
        name: one of ``REFINERS``.
        kwargs: arguments of its factory (e.g. ``net=...`` for ``"segai+genai"``), over its
            registered defaults.

    Returns:
        a :class:`Refiner` carrying ``name``, ``label``, ``needs`` and ``operating_point``.
    """
    return refiner_spec(name)(**kwargs)


def refiner_arguments(
    name: str, kwargs_by_method: Mapping[str, Mapping[str, Any]] | None = None, inpainter: Any | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``build_refiner(name, ...)`` from a config's per-method block.

    Args:
        name: registry name.
        kwargs_by_method: ``{method: {argument: value}}`` (``refiner_kwargs`` in the configs).
        inpainter: the inpainting network, passed as ``net`` to methods that need one.

    Raises:
        ValueError: when the method needs an inpainter and none is given.
    """
    kw = dict((kwargs_by_method or {}).get(name, {}) or {})
    if "inpainter" in refiner_spec(name).needs:
        if inpainter is None and "inpaint_fn" not in kw:
            raise ValueError(f"refiner {name!r} needs the inpainter; set inpainter_ckpt_path")
        kw.setdefault("net", inpainter)
    return kw


register_refiner("segai", SegAIRefiner, label="SegAI", operating_point=0.05,
                 description="SegAI's probability map unchanged")
register_refiner("sp1", partial(SPRefiner, method="sp1"), label="SP1 (GBD)", needs=(), operating_point=0.5,
                 description="Gaussian blur difference, no SegAI")
register_refiner("sp2", partial(SPRefiner, method="sp2"), label="SP2 (THT)", needs=(), operating_point=0.5,
                 description="white top-hat, no SegAI")
register_refiner("segai+sp1", partial(SPRefiner, method="sp1", use_segai=True), label="SegAI+R:SP1",
                 operating_point=0.04, description="SP1 weighted by pooled SegAI (seed Eq. 2)")
register_refiner("segai+sp2", partial(SPRefiner, method="sp2", use_segai=True), label="SegAI+R:SP2",
                 operating_point=0.12, description="SP2 weighted by pooled SegAI (seed Eq. 2)")
register_refiner("segai+genai", GenAIRefiner, label="SegAI+R:GenAI", needs=("segai", "inpainter"),
                 operating_point=0.6, description="virtual normal by the transformer inpainter (seed Eq. 3)")
register_refiner("segai+classical", partial(GenAIRefiner, inpaint_fn=classical_inpaint_fn()),
                 label="SegAI+R:Biharmonic", operating_point=0.6,
                 description="the same with biharmonic inpainting instead of the network")
register_refiner("grid_genai", GridGenAIRefiner, label="Grid-mask GenAI (no SegAI mask)", needs=("inpainter",),
                 operating_point=0.6, description="grid cells inpainted in turn, no SegAI mask (seed Table 2)")
