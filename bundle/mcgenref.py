"""MC-GenRef: synthetic supervision, a seed-conditioned rectified-flow (RF) generator and TT-GPR.

The method (``docs/mcgenref.md``) has three parts:

1. **Synthetic supervision.** :class:`InjectSyntheticMCd` injects microcalcification (MC) clusters
   into calcification-free (normalised) mammogram patches with the image-formation model of
   :func:`bundle.phantom.inject_mcs` (pixel-averaged MC thickness profile, Gaussian detector blur,
   multiplicative attenuation ``1 - c * blur(p)`` = additive ``-gain * log(1 - c * blur(p))`` in
   the bright = dense log domain), giving exact image / label / seed triples on the fly. The
   injection runs in the *normalised* domain with a fixed ``gain = 1``: the normalisation maps the
   breast's 1st..99th percentiles to 0..1, and ``inject_mcs`` converts contrast to grey levels
   with ``gain = (p99 - p1) / 1.0``, so one normalised unit is one breast log-spread and injecting
   with ``gain = 1`` after normalisation equals injecting into the raw image with the whole-breast
   gain before it (tested). Letting ``inject_mcs`` estimate the gain on a *patch* would be wrong:
   a patch's percentile spread is not the breast's (a fatty patch spans ~0.2, so MCs would come
   out ~5x too faint).
2. **Seed-conditioned RF generator.** :class:`SeedRFGenerator` (MONAI ``DiffusionModelUNet``,
   trained with ``RFlowScheduler``) models the *MC layer* that completes a faint observation into
   a full-contrast MC-bearing patch: given a sparse seed map (MC centre points) and the observed
   context (the patch and its high-pass), it samples ``r`` with ``projection = context + r``.
   Training pairs (:class:`MakeRFlowPaird`): context = background + alpha * MC layer (alpha ~
   U(0.1, 1)), target = (1 - alpha) * MC layer, plus spurious seeds on background peaks whose
   target is zero, so the generator learns not to paint MCs where the context holds no evidence.
   Sampling uses a few Euler steps (:func:`euler_sample`) so that it runs on a CPU.
3. **TT-GPR** (:class:`TTGPRInferer`): for ``K`` iterations, derive a sparse seed from the current
   probability (local maxima above a threshold), draw seed-consistent RF projections of the
   observed tiles, run the frozen segmentor on them to get surrogate targets and update the
   per-tile logits by gradient steps on data + overlap-consistency + edge-aware smoothness +
   proximity terms. Only tiles where the initializer or a seed fires are refined.

RF convention of MONAI 1.6.1 (checked in ``tests/test_mcgenref.py``): ``add_noise`` returns
``(1 - t/T) * x0 + (t/T) * noise``, so ``t = T`` is pure noise, the network predicts the velocity
``v = x0 - noise`` and ``step`` moves ``x <- x + v * (t - t_next) / T`` towards ``t = 0``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

from bundle.inferers import BreastTileInferer, iter_tiles

__all__ = [
    "InjectSyntheticMCd",
    "MakeRFlowPaird",
    "extract_seeds",
    "seeds_from_label",
    "render_seed_map",
    "seed_neighbourhood",
    "context_channels",
    "make_condition",
    "COND_CHANNELS",
    "SeedRFGenerator",
    "RFlowPrepareBatch",
    "euler_sample",
    "edge_weights",
    "tile_disagreement",
    "TTGPRInferer",
    "TTGPRRefiner",
    "MCGenRefMethods",
    "build_study_methods",
    "mcgenref_refiner",
    "load_generator",
    "WallTimeLimit",
    "evaluate_injected",
    "heldout_eval",
]

logger = logging.getLogger("mcref.mcgenref")

#: channels of the generator's condition: rendered seed map, context, context high-pass.
COND_CHANNELS = 3


# ----------------------------------------------------------------------------------------------
# small tensor helpers
# ----------------------------------------------------------------------------------------------
def _plain(x: Any) -> torch.Tensor:
    """A plain float tensor (no MONAI meta) from a MetaTensor, tensor or array.

    Args:
        x: input.
    """
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()


def _as4d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """View a ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)`` tensor as ``(N, 1, H, W)``.

    Args:
        x: tensor with at least two dimensions.
    """
    shape = x.shape
    if x.ndim < 2:
        raise ValueError(f"expected at least 2-D input, got shape {tuple(shape)}")
    return x.reshape(-1, 1, shape[-2], shape[-1]), shape


def _like_meta(ref: Any, data: torch.Tensor) -> torch.Tensor:
    """``data`` as a MetaTensor with a copy of ``ref``'s meta data and affine (when it has them).

    Args:
        ref: reference (MetaTensor or anything).
        data: new values.
    """
    if isinstance(ref, MetaTensor):
        meta = {k: v for k, v in ref.meta.items() if k != "affine"}
        return MetaTensor(data, affine=ref.affine, meta=meta)
    return data


def _gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel (radius ``ceil(3 sigma)``).

    Args:
        sigma: standard deviation in pixels (> 0).
        device: tensor device.
    """
    r = max(1, int(math.ceil(3.0 * sigma)))
    xs = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` with reflect padding (replicate when tiny).

    Args:
        x: input.
        sigma: standard deviation in pixels; ``<= 0`` returns ``x``.
    """
    if sigma <= 0:
        return x
    k = _gaussian_kernel1d(sigma, x.device)
    r = k.numel() // 2
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------
def extract_seeds(
    prob: torch.Tensor | np.ndarray,
    threshold: float = 0.3,
    radius: int = 2,
    mask: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Sparse seed points: local maxima of ``prob`` above ``threshold`` (one per plateau window).

    A pixel is a seed when it is the maximum of its ``(2 radius + 1)^2`` window, its value is
    ``>= threshold`` and it lies in ``mask``. Ties (plateaus) keep only the pixel with the largest
    linear index in the window, so a saturated blob gives one seed per window, not one per pixel.

    Args:
        prob: probability map ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``.
        threshold: minimum probability of a seed.
        radius: non-maximum-suppression radius in pixels.
        mask: optional mask broadcastable to ``prob`` (non-zero = allowed).

    Returns:
        bool tensor of ``prob``'s shape.
    """
    p = _plain(prob)
    p4, shape = _as4d(p)
    k = 2 * int(radius) + 1
    mx = F.max_pool2d(p4, k, stride=1, padding=int(radius))
    peaks = (p4 >= mx) & (p4 >= float(threshold))
    if mask is not None:
        m4, _ = _as4d(torch.broadcast_to(_plain(mask).to(p.device), p.shape))
        peaks &= m4 > 0
    if peaks.any():
        idx = torch.arange(1, p4.shape[-2] * p4.shape[-1] + 1, dtype=torch.float32, device=p4.device)
        q = peaks.float() * idx.view(1, 1, p4.shape[-2], p4.shape[-1])
        peaks &= q >= F.max_pool2d(q, k, stride=1, padding=int(radius))
    return peaks.reshape(shape)


def seeds_from_label(label: torch.Tensor | np.ndarray, connectivity: int = 2) -> torch.Tensor:
    """One seed per connected MC object: its pixel closest to the object's centroid.

    Args:
        label: binary label ``(H, W)`` or ``(1, H, W)``.
        connectivity: 1 (4-) or 2 (8-connectivity).

    Returns:
        bool tensor of ``label``'s shape.
    """
    lab = _plain(label)
    arr = lab.reshape(lab.shape[-2], lab.shape[-1]).numpy() > 0.5
    out = np.zeros(arr.shape, dtype=bool)
    comps, n = ndimage.label(arr, structure=ndimage.generate_binary_structure(2, connectivity))
    if n:
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            ys, xs = np.nonzero(comps[sl] == i)
            cy, cx = ys.mean(), xs.mean()
            j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
            out[sl[0].start + ys[j], sl[1].start + xs[j]] = True
    return torch.from_numpy(out).reshape(lab.shape)


def render_seed_map(points: torch.Tensor | np.ndarray, sigma: float = 1.0) -> torch.Tensor:
    """Render seed points as Gaussian blobs with peak 1 (the generator's seed channel).

    Args:
        points: binary point map ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``.
        sigma: blob standard deviation in pixels; ``<= 0`` returns the points as float.

    Returns:
        float tensor of the input's shape, values in ``[0, 1]``.
    """
    p = _plain(points)
    if sigma <= 0:
        return (p > 0).float()
    p4, shape = _as4d((p > 0).float())
    k1 = _gaussian_kernel1d(sigma, p4.device)
    k1 = k1 / k1.max()
    r = k1.numel() // 2
    y = F.conv2d(F.pad(p4, (r, r, 0, 0)), k1.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r)), k1.view(1, 1, -1, 1))
    return y.clamp(0.0, 1.0).reshape(shape)


def seed_neighbourhood(points: torch.Tensor, radius: int) -> torch.Tensor:
    """Square neighbourhoods (``2 radius + 1`` wide) of the seed points, as a float 0/1 map.

    Args:
        points: binary point map ``(N, 1, H, W)``.
        radius: half width in pixels.
    """
    p4, shape = _as4d(_plain(points))
    r = int(radius)
    out = F.max_pool2d((p4 > 0).float(), 2 * r + 1, stride=1, padding=r) if r > 0 else (p4 > 0).float()
    return out.reshape(shape)


def context_channels(context: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Observed-context channels of the generator: the patch and its high-pass (patch - blur).

    Args:
        context: ``(N, 1, H, W)`` normalised patches.
        sigma: Gaussian sigma (pixels) of the low-pass removed by the high-pass channel.

    Returns:
        ``(N, 2, H, W)``.
    """
    c = _plain(context)
    return torch.cat([c, c - _blur(c, sigma)], dim=1)


def make_condition(
    context: torch.Tensor, seed_points: torch.Tensor, seed_sigma: float = 1.0, context_sigma: float = 2.0
) -> torch.Tensor:
    """The generator's condition ``[seed map, context, context high-pass]``, ``(N, 3, H, W)``.

    Args:
        context: ``(N, 1, H, W)`` observed patches.
        seed_points: ``(N, 1, H, W)`` binary seed points.
        seed_sigma: blob sigma of the rendered seed map.
        context_sigma: low-pass sigma of the high-pass channel.
    """
    seeds = render_seed_map(seed_points, seed_sigma).to(context.device)
    return torch.cat([seeds, context_channels(context, context_sigma)], dim=1)


# ----------------------------------------------------------------------------------------------
# synthetic pairs
# ----------------------------------------------------------------------------------------------
class InjectSyntheticMCd(RandomizableTransform, MapTransform):
    """Inject synthetic MC clusters into a calcification-free image: exact image/label/seed triples.

    Uses :func:`bundle.phantom.inject_mcs` (same image-formation model as the phantoms). With the
    default ``gain=1.0`` the image is expected to be *normalised* by
    :class:`bundle.data.NormalizeMammogramd` (breast p1 -> 0, p99 -> 1), where one unit is one
    breast log-spread; this equals injecting into the raw image with the whole-breast gain before
    normalising, and also holds for patches (whose own percentile spread is not the breast's).
    Pass ``gain=None`` only for whole raw images (``inject_mcs`` then estimates the gain from the
    breast percentiles).

    Outputs (all ``(1, H, W)`` float32, carrying the image's meta data): the injected image under
    the key, ``label_key`` (exact 0/1 MC mask), ``seed_key`` (0/1 MC centre points, the sparse
    seed of the generator) and, when ``background_key`` is set, the clean input. With probability
    ``1 - prob`` nothing is injected (empty label and seed): negative samples.

    Args:
        keys: the image key (one).
        label_key: output label key.
        seed_key: output seed-point key.
        breast_key: breast mask key; MC pixels lie inside it (missing key: the whole image).
        background_key: where to keep the clean image (None: not kept).
        prob: probability of injecting.
        spacing_mm: pixel size; None reads ``working_spacing`` (else ``spacing``) from the meta data,
            falling back to 0.07 mm.
        gain: grey levels per log-attenuation unit (1.0 for normalised images; None: estimated).
        n_clusters: clusters per call, int or inclusive range.
        contrast: MC contrast range (see ``inject_mcs``).
        diameter_mm: MC diameter range in mm.
        mcs_per_cluster: MCs per cluster, inclusive range.
        cluster_extent_mm: cluster extent range in mm.
        psf_sigma_px: detector blur sigma (pixels), value or range.
        margin_mm: minimum distance of MC pixels to the border of the breast / patch.
        noise_std: range of the std of extra Gaussian noise added where the MC layer is non-zero
            (quantum noise of the attenuated signal); ``(0, 0)`` adds none.
        allow_missing_keys: don't raise when the image key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str = "label",
        seed_key: str = "seed",
        breast_key: str | None = "breast",
        background_key: str | None = None,
        prob: float = 1.0,
        spacing_mm: float | None = None,
        gain: float | None = 1.0,
        n_clusters: int | Sequence[int] = (1, 2),
        contrast: float | Sequence[float] = (0.05, 0.35),
        diameter_mm: float | Sequence[float] = (0.1, 0.7),
        mcs_per_cluster: int | Sequence[int] = (1, 15),
        cluster_extent_mm: float | Sequence[float] = (1.5, 8.0),
        psf_sigma_px: float | Sequence[float] = (0.5, 0.7),
        margin_mm: float = 0.5,
        noise_std: float | Sequence[float] = (0.0, 0.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key, self.seed_key = label_key, seed_key
        self.breast_key, self.background_key = breast_key, background_key
        self.spacing_mm = None if spacing_mm is None else float(spacing_mm)
        self.gain = None if gain is None else float(gain)
        self.inject_kwargs = {
            "n_clusters": n_clusters,
            "contrast": contrast,
            "diameter_mm": diameter_mm,
            "mcs_per_cluster": mcs_per_cluster,
            "cluster_extent_mm": cluster_extent_mm,
            "psf_sigma_px": psf_sigma_px,
            "margin_mm": float(margin_mm),
        }
        ns = (float(noise_std), float(noise_std)) if np.isscalar(noise_std) else tuple(float(v) for v in noise_std)
        self.noise_std = (ns[0], ns[1])
        self._rng_seed = 0
        self.last_clusters: list[dict[str, Any]] = []

    def randomize(self, data: Any = None) -> None:
        """Draw whether to inject and the seed of this call's ``numpy.random.Generator``."""
        super().randomize(None)
        self._rng_seed = int(self.R.randint(0, 2**31 - 1))

    def _spacing(self, img: Any) -> float:
        if self.spacing_mm is not None:
            return self.spacing_mm
        meta = getattr(img, "meta", {}) or {}
        sp = meta.get("working_spacing")
        if sp:
            return float(sp)
        sp = meta.get("spacing")
        if sp is not None:
            try:
                return float(min(np.asarray(sp, dtype=float).ravel()))
            except (TypeError, ValueError):
                pass
        return 0.07

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Inject (or not) and add the label and seed keys."""
        from bundle.phantom import inject_mcs

        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            arr = _plain(img)
            if arr.ndim != 3 or arr.shape[0] != 1:
                raise ValueError(f"InjectSyntheticMCd expects a (1, H, W) image, got {tuple(arr.shape)}")
            base = arr[0].numpy().astype(np.float32)
            h, w = base.shape
            if self.breast_key is not None and self.breast_key in d:
                breast = _plain(d[self.breast_key]).reshape(h, w).numpy() > 0
            else:
                breast = np.ones((h, w), dtype=bool)
            out, label = base, np.zeros((h, w), dtype=np.uint8)
            seeds = np.zeros((h, w), dtype=np.float32)
            clusters: list[dict[str, Any]] = []
            if self._do_transform and breast.any():
                rng = np.random.default_rng(self._rng_seed)
                out, label, clusters = inject_mcs(
                    base, breast, self._spacing(img), rng, gain=self.gain, **self.inject_kwargs
                )
                lo, hi = self.noise_std
                if hi > 0:
                    layer = out - base
                    sd = float(rng.uniform(lo, hi))
                    support = np.abs(layer) > 1e-4
                    out = out + (sd * rng.standard_normal((h, w)).astype(np.float32)) * support
                for cl in clusters:
                    for mc in cl["mcs"]:
                        r = int(np.clip(round(mc["centre"][0]), 0, h - 1))
                        c = int(np.clip(round(mc["centre"][1]), 0, w - 1))
                        seeds[r, c] = 1.0
            self.last_clusters = clusters
            if self.background_key is not None:
                d[self.background_key] = _like_meta(img, torch.from_numpy(base.copy())[None])
            d[key] = _like_meta(img, torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None])
            d[self.label_key] = _like_meta(img, torch.from_numpy(label.astype(np.float32))[None])
            d[self.seed_key] = _like_meta(img, torch.from_numpy(seeds)[None])
        return d


class MakeRFlowPaird(RandomizableTransform, MapTransform):
    """Build one training pair of the seed-conditioned RF generator from an injected sample.

    With the MC layer ``m = image - background`` (from :class:`InjectSyntheticMCd`) and a random
    visibility ``alpha ~ U(alpha)``: the observed context is ``background + alpha * m`` (a faint
    version of the MCs) and the target is ``residual_scale * (1 - alpha) * m``: the layer that
    completes the context to the full-contrast MC-bearing patch. The seed map holds the MC centre
    points plus ``n_spurious`` spurious seeds on the brightest high-pass peaks of the background
    away from MCs (their target is 0), so that seeds without evidence are not painted.

    Outputs ``target_key`` ``(1, H, W)`` and ``cond_key`` ``(3, H, W)`` = ``make_condition``.

    Args:
        keys: the injected image key.
        background_key: the clean image key.
        seed_key: seed-point key.
        label_key: label key (spurious seeds keep away from it); may be absent.
        breast_key: breast key (spurious seeds lie inside it); may be absent.
        target_key: output target key.
        cond_key: output condition key.
        alpha: range of the visibility of the MCs in the context.
        n_spurious: inclusive range of spurious seeds per sample.
        spurious_candidates: number of brightest high-pass peaks the spurious seeds are drawn from.
        residual_scale: multiplier of the target (the MC layer is ~0.05-0.4 normalised units).
        seed_sigma: blob sigma of the rendered seeds.
        context_sigma: low-pass sigma of the context high-pass channel.
        allow_missing_keys: see ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        background_key: str = "background",
        seed_key: str = "seed",
        label_key: str = "label",
        breast_key: str = "breast",
        target_key: str = "target",
        cond_key: str = "cond",
        alpha: Sequence[float] = (0.1, 1.0),
        n_spurious: Sequence[int] = (0, 3),
        spurious_candidates: int = 20,
        residual_scale: float = 5.0,
        seed_sigma: float = 1.0,
        context_sigma: float = 2.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.background_key, self.seed_key, self.label_key, self.breast_key = background_key, seed_key, label_key, breast_key
        self.target_key, self.cond_key = target_key, cond_key
        self.alpha = (float(alpha[0]), float(alpha[1]))
        self.n_spurious = (int(n_spurious[0]), int(n_spurious[1]))
        self.spurious_candidates = int(spurious_candidates)
        self.residual_scale = float(residual_scale)
        self.seed_sigma, self.context_sigma = float(seed_sigma), float(context_sigma)
        self._alpha = 1.0
        self._n_sp = 0
        self._pick_seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw alpha, the number of spurious seeds and their choice."""
        self._alpha = float(self.R.uniform(*self.alpha))
        self._n_sp = int(self.R.randint(self.n_spurious[0], self.n_spurious[1] + 1))
        self._pick_seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the target and the condition."""
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = _plain(d[key])
            bg = _plain(d[self.background_key])
            h, w = img.shape[-2:]
            layer = (img - bg).reshape(1, 1, h, w)
            context = bg.reshape(1, 1, h, w) + self._alpha * layer
            target = self.residual_scale * (1.0 - self._alpha) * layer
            seeds = (_plain(d[self.seed_key]).reshape(1, 1, h, w) > 0).float()
            if self._n_sp > 0:
                busy = seed_neighbourhood(seeds, 4) > 0
                if self.label_key in d:
                    busy |= seed_neighbourhood(_plain(d[self.label_key]).reshape(1, 1, h, w), 4) > 0
                allowed = ~busy
                if self.breast_key in d:
                    allowed &= _plain(d[self.breast_key]).reshape(1, 1, h, w) > 0
                hp = context - _blur(context, self.context_sigma)
                peaks = extract_seeds(hp, threshold=-1e9, radius=3, mask=allowed)
                cand = torch.nonzero(peaks[0, 0])
                if cand.shape[0] > 0:
                    vals = hp[0, 0][cand[:, 0], cand[:, 1]]
                    order = torch.argsort(vals, descending=True)[: self.spurious_candidates]
                    rng = np.random.default_rng(self._pick_seed)
                    pick = rng.choice(order.numel(), size=min(self._n_sp, order.numel()), replace=False)
                    for j in np.atleast_1d(pick):
                        r, c = cand[order[int(j)]]
                        seeds[0, 0, r, c] = 1.0
            cond = make_condition(context, seeds, self.seed_sigma, self.context_sigma)
            d[self.target_key] = target[0]
            d[self.cond_key] = cond[0]
        return d


# ----------------------------------------------------------------------------------------------
# RF generator
# ----------------------------------------------------------------------------------------------
class SeedRFGenerator(torch.nn.Module):
    """Seed-conditioned rectified-flow generator of the MC layer (MONAI ``DiffusionModelUNet``).

    Network input ``(N, 1 + 3, H, W)`` = ``[x_t, seed map, context, context high-pass]`` and the
    timesteps; output the RF velocity ``x0 - noise`` of the scaled MC layer ``x0``.
    ``H, W`` must be multiples of ``2 ** (len(channels) - 1)``.

    Args:
        channels: feature channels per level of the UNet.
        attention_levels: self-attention per level.
        num_res_blocks: residual blocks per level.
        norm_num_groups: group-norm groups (divides every entry of ``channels``).
        num_head_channels: channels per attention head.
        num_train_timesteps: RF timesteps ``T``.
        residual_scale: the target is the MC layer times this factor (as in :class:`MakeRFlowPaird`).
        seed_sigma: blob sigma of the rendered seed channel.
        context_sigma: low-pass sigma of the high-pass context channel.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        attention_levels: Sequence[bool] = (False, False, False),
        num_res_blocks: int = 1,
        norm_num_groups: int = 8,
        num_head_channels: int = 32,
        num_train_timesteps: int = 1000,
        residual_scale: float = 5.0,
        seed_sigma: float = 1.0,
        context_sigma: float = 2.0,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1 + COND_CHANNELS,
            out_channels=1,
            channels=tuple(int(c) for c in channels),
            attention_levels=tuple(bool(a) for a in attention_levels),
            num_res_blocks=int(num_res_blocks),
            norm_num_groups=int(norm_num_groups),
            num_head_channels=int(num_head_channels),
        )
        self.num_train_timesteps = int(num_train_timesteps)
        self.residual_scale = float(residual_scale)
        self.seed_sigma, self.context_sigma = float(seed_sigma), float(context_sigma)
        self.multiple = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Velocity prediction.

        Args:
            x: ``(N, 4, H, W)`` = ``[x_t, condition]``.
            timesteps: ``(N,)`` RF timesteps in ``[0, T]``.
        """
        return self.unet(x, timesteps)

    def scheduler(self) -> Any:
        """A fresh MONAI ``RFlowScheduler`` with this generator's ``T`` (not a registered submodule)."""
        from monai.networks.schedulers import RFlowScheduler

        return RFlowScheduler(num_train_timesteps=self.num_train_timesteps, use_discrete_timesteps=True, spatial_dim=2)

    def condition(self, context: torch.Tensor, seed_points: torch.Tensor) -> torch.Tensor:
        """The condition channels for ``context`` ``(N, 1, H, W)`` and seed points ``(N, 1, H, W)``.

        Args:
            context: observed patches.
            seed_points: binary seed points.
        """
        return make_condition(context, seed_points, self.seed_sigma, self.context_sigma)

    @torch.no_grad()
    def sample(
        self,
        context: torch.Tensor,
        seed_points: torch.Tensor,
        n_steps: int = 4,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        restrict_radius: int | None = 6,
    ) -> torch.Tensor:
        """Seed-consistent RF projections ``context + r`` of observed patches (few-step Euler).

        Args:
            context: ``(N, 1, H, W)`` observed (normalised) patches.
            seed_points: ``(N, 1, H, W)`` binary seed points.
            n_steps: Euler steps from ``t = T`` (noise) to ``t = 0``.
            n_samples: projections per patch.
            generator: random generator of the initial noise (CPU).
            restrict_radius: keep the sampled layer only within this many pixels of a seed
                (None: everywhere).

        Returns:
            ``(N, n_samples, 1, H, W)`` projections.
        """
        n, _, h, w = context.shape
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        ctx = F.pad(context, (0, pw, 0, ph), mode="replicate") if (ph or pw) else context
        pts = F.pad(seed_points.float(), (0, pw, 0, ph)) if (ph or pw) else seed_points.float()
        cond = self.condition(ctx, pts).repeat_interleave(n_samples, dim=0)
        noise = torch.randn((cond.shape[0], 1, *cond.shape[-2:]), generator=generator).to(cond.device)
        layer = euler_sample(self, cond, self.scheduler(), n_steps, noise) / self.residual_scale
        layer = layer[..., :h, :w]
        if restrict_radius is not None:
            layer = layer * seed_neighbourhood(seed_points.float(), int(restrict_radius)).repeat_interleave(n_samples, dim=0)
        out = context.repeat_interleave(n_samples, dim=0) + layer
        return out.reshape(n, n_samples, 1, h, w)


def euler_sample(
    network: Callable[..., torch.Tensor],
    cond: torch.Tensor,
    scheduler: Any,
    n_steps: int,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Few-step Euler integration of the RF ODE from noise (``t = T``) to data (``t = 0``).

    Args:
        network: velocity network called as ``network(cat([x_t, cond]), timesteps)``.
        cond: ``(N, C, H, W)`` condition channels.
        scheduler: a MONAI ``RFlowScheduler`` (its ``set_timesteps`` / ``step`` are used).
        n_steps: number of Euler steps.
        noise: ``(N, 1, H, W)`` starting noise.

    Returns:
        ``(N, 1, H, W)`` the sample at ``t = 0``.
    """
    scheduler.set_timesteps(num_inference_steps=int(n_steps), device=cond.device)
    ts = scheduler.timesteps
    nxt = torch.cat([ts[1:], torch.zeros(1, dtype=ts.dtype, device=ts.device)])
    x = noise
    for t, tn in zip(ts, nxt):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        v = network(torch.cat([x, cond], dim=1), tt)
        x, _ = scheduler.step(v, int(t), x, int(tn))
    return x


class RFlowPrepareBatch(PrepareBatch):
    """Turn a ``{target, cond}`` batch into an RF training step for ``SupervisedTrainer``.

    Draws ``noise ~ N(0, 1)`` and ``t`` (uniform or logit-normal on ``[0, T)``) from its own seeded
    generator, forms ``x_t = scheduler.add_noise(x0, noise, t)`` and returns
    ``(cat([x_t, cond]), x0 - noise, (), {"timesteps": t})``: the network predicts the velocity,
    and the trainer's loss (MSE) compares it to ``x0 - noise``.

    Args:
        num_train_timesteps: ``T``.
        target_key: key of ``x0``.
        cond_key: key of the condition channels.
        sample_method: ``"uniform"`` or ``"logit-normal"``.
        loc: logit-normal location.
        scale: logit-normal scale.
        seed: seed of the noise / timestep generator.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        target_key: str = "target",
        cond_key: str = "cond",
        sample_method: str = "uniform",
        loc: float = 0.0,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        from monai.networks.schedulers import RFlowScheduler

        if sample_method not in ("uniform", "logit-normal"):
            raise ValueError(f"sample_method must be 'uniform' or 'logit-normal', got {sample_method!r}")
        self.scheduler = RFlowScheduler(num_train_timesteps=int(num_train_timesteps), use_discrete_timesteps=True, spatial_dim=2)
        self.T = int(num_train_timesteps)
        self.target_key, self.cond_key = target_key, cond_key
        self.sample_method, self.loc, self.scale = sample_method, float(loc), float(scale)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        """Build ``(inputs, velocity target, args, kwargs)``.

        Args:
            batchdata: batch with the target and condition keys.
            device: target device.
            non_blocking: passed to ``Tensor.to``.
            kwargs: other ``Tensor.to`` arguments.
        """
        x0 = _plain(batchdata[self.target_key])
        cond = _plain(batchdata[self.cond_key])
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=self.generator)
        if self.sample_method == "uniform":
            u = torch.rand((n,), generator=self.generator)
        else:
            u = torch.sigmoid(self.loc + self.scale * torch.randn((n,), generator=self.generator))
        t = (u * self.T).long().clamp(0, self.T - 1)
        xt = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        inputs = torch.cat([xt, cond], dim=1).to(device=device, non_blocking=non_blocking, **kwargs)
        target = (x0 - noise).to(device=device, non_blocking=non_blocking, **kwargs)
        return inputs, target, (), {"timesteps": t.to(device=device)}


def load_generator(
    generator: SeedRFGenerator, path: str | os.PathLike | None, device: str | torch.device = "cpu", required: bool = True
) -> SeedRFGenerator | None:
    """Load RF generator weights (plain state dict or ``{"network": ...}``).

    Args:
        generator: the module to fill.
        path: weights file.
        device: where to map the tensors.
        required: raise when the file is missing; otherwise warn and return None (TT-GPR then uses
            the observed tile itself as the only projection).
    """
    from bundle.networks import load_checkpoint

    if not path or not os.path.isfile(str(path)):
        if required:
            raise FileNotFoundError(f"{path}: RF generator weights not found; train them with configs/train_rflow.json")
        logger.warning("no RF generator weights at %s: TT-GPR runs without generative projections", path)
        return None
    return load_checkpoint(generator, path, device)  # type: ignore[return-value]


class WallTimeLimit:
    """Ignite handler: stop training (``engine.terminate()``) once the loop has run ``limit_s`` seconds.

    The clock starts when the engine starts (after data caching). ``COMPLETED`` handlers such as
    ``CheckpointSaver(save_final=True)`` still run after the stop. ``limit_s <= 0`` disables it.

    Args:
        limit_s: wall-time budget of the training loop in seconds.
    """

    def __init__(self, limit_s: float = 0.0) -> None:
        self.limit_s = float(limit_s)
        self._start = 0.0

    def attach(self, engine: Any) -> None:
        """Register on ``engine`` (``STARTED`` and ``ITERATION_COMPLETED``).

        Args:
            engine: an ignite engine.
        """
        from ignite.engine import Events

        if self.limit_s > 0:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Any) -> None:
        import time

        self._start = time.perf_counter()

    def __call__(self, engine: Any) -> None:
        """Terminate when over budget.

        Args:
            engine: the running engine.
        """
        import time

        elapsed = time.perf_counter() - self._start
        if elapsed > self.limit_s:
            logger.info("time budget of %.0f s reached at iteration %d: stopping", self.limit_s, engine.state.iteration)
            engine.terminate()


# ----------------------------------------------------------------------------------------------
# TT-GPR
# ----------------------------------------------------------------------------------------------
def edge_weights(image: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge-stopping weights ``exp(-|grad image| / sigma)`` for horizontal and vertical neighbours.

    Args:
        image: ``(N, 1, H, W)``.
        sigma: gradient scale (normalised intensity units); ``inf`` gives weights 1.

    Returns:
        ``(w_x (N, 1, H, W - 1), w_y (N, 1, H - 1, W))``.
    """
    gx = (image[..., :, 1:] - image[..., :, :-1]).abs()
    gy = (image[..., 1:, :] - image[..., :-1, :]).abs()
    if not math.isfinite(sigma):
        return torch.ones_like(gx), torch.ones_like(gy)
    return torch.exp(-gx / sigma), torch.exp(-gy / sigma)


def _tile_index(tiles: Sequence[tuple[slice, slice]], shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Flat canvas indices ``(N, th * tw)`` of the pixels of every tile.

    Args:
        tiles: ``(row_slice, col_slice)`` per tile (all of the same size).
        shape: canvas shape.
        device: tensor device.
    """
    rs0, cs0 = tiles[0]
    th, tw = rs0.stop - rs0.start, cs0.stop - cs0.start
    r0 = torch.tensor([rs.start for rs, _ in tiles], device=device).view(-1, 1, 1)
    c0 = torch.tensor([cs.start for _, cs in tiles], device=device).view(-1, 1, 1)
    rows = r0 + torch.arange(th, device=device).view(1, -1, 1)
    cols = c0 + torch.arange(tw, device=device).view(1, 1, -1)
    return (rows * shape[1] + cols).reshape(len(tiles), -1)


def _place(values: torch.Tensor, tiles: Sequence[tuple[slice, slice]], shape: tuple[int, int]) -> torch.Tensor:
    """Sum tile values ``(N, 1, t, t)`` into a ``(1, 1, H, W)`` canvas (differentiable).

    Args:
        values: per-tile maps.
        tiles: ``(row_slice, col_slice)`` per tile.
        shape: canvas shape.
    """
    idx = _tile_index(tiles, shape, values.device)
    flat = values.new_zeros(shape[0] * shape[1]).index_add(0, idx.reshape(-1), values.reshape(-1))
    return flat.view(1, 1, *shape)


def _gather(canvas: torch.Tensor, tiles: Sequence[tuple[slice, slice]]) -> torch.Tensor:
    """Crop ``(1, 1, H, W)`` into ``(N, 1, t, t)`` tiles.

    Args:
        canvas: the map.
        tiles: ``(row_slice, col_slice)`` per tile.
    """
    rs0, cs0 = tiles[0]
    th, tw = rs0.stop - rs0.start, cs0.stop - cs0.start
    idx = _tile_index(tiles, tuple(canvas.shape[-2:]), canvas.device)
    return canvas.reshape(-1)[idx].view(len(tiles), 1, th, tw)


def tile_disagreement(z: torch.Tensor, tiles: Sequence[tuple[slice, slice]], shape: tuple[int, int]) -> float:
    """Mean squared difference between each tile's map and the overlap-averaged map.

    Args:
        z: ``(N, 1, t, t)`` per-tile maps.
        tiles: their positions.
        shape: canvas shape.
    """
    with torch.no_grad():
        count = _place(torch.ones_like(z), tiles, shape).clamp_min(1.0)
        avg = _place(z, tiles, shape) / count
        return float(((z - _gather(avg, tiles)) ** 2).mean())


class TTGPRInferer(Inferer):
    """Test-time generative posterior refinement (TT-GPR) of a segmentor's MC map.

    ``__call__(inputs, network, breast=None)`` runs the initializer (``init_inferer``, a
    :class:`bundle.inferers.BreastTileInferer`, with ``network``) and then :meth:`refine`, which
    works on a grid of ``tile_size`` tiles with ``overlap`` and refines only *active* tiles: tiles
    with breast where the initial probability reaches ``fire_threshold`` or holds a seed
    (``fire_threshold <= 0``: every breast tile). The variables are the per-tile logits ``z_k``,
    initialised with the segmentor's own logits on each tile, ``z_k^0``. For ``iterations`` (K)
    rounds:

    1. seeds = local maxima (radius ``seed_radius``) of the overlap-averaged probability above
       ``seed_threshold`` inside the breast;
    2. ``n_samples`` seed-consistent RF projections of the observed image, drawn once per round
       (``generator.sample`` on the bounding box of each seed group grown by ``gen_margin``,
       ``euler_steps`` Euler steps, layer restricted to ``restrict_radius`` pixels around the
       seeds); for tiles holding seeds, the frozen segmentor's mean sigmoid on the projected
       tiles (seen with a ``seg_margin`` border) is the surrogate target ``s_k`` (tiles without
       seeds: the segmentor on the observed tile), averaged with the previous round's target
       with weight ``target_momentum``;
    3. ``inner_steps`` gradient steps ``z <- z - step_size * dE_sum/dz`` (or Adam) on the
       per-pixel mean objective

       ``E = w_data * BCE(z_k, s_k)`` (or soft Dice) ``+ w_overlap * (z_k - A(z)_k)^2``
       ``+ w_edge * sum_dir exp(-|grad I| / edge_sigma) * (sqrt(dz^2 + tv_eps^2) - tv_eps)``
       ``+ w_prox * (z_k - z_k^0)^2``,

       where ``A(z)`` is the overlap-averaged logit map cropped back to tile ``k``. The objective
       is logged (``logger.info``) at the start and end of each round and kept in ``history``.

    The output is the overlap average of ``sigmoid(z_k)`` on the active tiles and the initial
    probability elsewhere, multiplied by the breast mask when one is given (``mask_output``).

    Args:
        generator: a trained :class:`SeedRFGenerator`, or None (surrogates then come from the
            observed tiles only: a plain regularised self-training step).
        init_inferer: the initializer's tile inferer (default ``BreastTileInferer(512, 0.125)``).
        tile_size: refinement tile size (multiple of the generator's ``2 ** (levels - 1)``).
        overlap: fractional tile overlap, in [0, 1).
        iterations: K, the number of seed / projection / update rounds.
        inner_steps: gradient steps per round.
        step_size: gradient step size (per pixel).
        optimizer: ``"gd"`` (plain gradient descent) or ``"adam"``.
        n_samples: RF projections per tile and round.
        euler_steps: Euler steps per projection.
        seed_threshold: minimum probability of a seed.
        seed_radius: non-maximum-suppression radius of the seeds.
        fire_threshold: a tile is refined when its initial probability reaches this value (or it
            holds a seed).
        restrict_radius: the generated layer is kept within this many pixels of a seed.
        w_data: weight of the data term.
        w_overlap: weight of the overlap-consistency term.
        w_edge: weight of the edge-aware total variation.
        w_prox: weight of the proximity to the initial logits.
        edge_sigma: gradient scale of the edge-stopping weights.
        tv_eps: Charbonnier smoothing of the total variation (logit units).
        target_momentum: weight of the new surrogate when averaging with the previous target.
        data_loss: ``"bce"`` or ``"dice"`` (soft Dice per tile).
        logit_clip: initial logits are clipped to ``[-logit_clip, logit_clip]``.
        tile_batch: tiles per network call.
        gen_margin: the generator runs on the bounding boxes of seed groups grown by this many
            pixels (its context), once per round for the whole image, not on every tile.
        gen_max_box: seed groups whose bounding box is larger are sampled in cores of at most this
            side (each with ``gen_margin`` pixels of context), which bounds the generator's
            memory and time on images with many seeds.
        seg_margin: the segmentor sees each tile grown by this many pixels (cropped back), so
            refinement tiles have the initializer's context at their borders.
        mask_output: multiply the result by the breast mask.
        return_init: return ``[refined, initial]`` channels.
        seed: seed of the RF sampling noise (reset at every call).
    """

    def __init__(
        self,
        generator: SeedRFGenerator | None = None,
        init_inferer: Callable[..., torch.Tensor] | None = None,
        tile_size: int = 128,
        overlap: float = 0.25,
        iterations: int = 3,
        inner_steps: int = 10,
        step_size: float = 0.25,
        optimizer: str = "gd",
        n_samples: int = 2,
        euler_steps: int = 4,
        seed_threshold: float = 0.15,
        seed_radius: int = 2,
        fire_threshold: float = 0.5,
        restrict_radius: int | None = 6,
        w_data: float = 1.0,
        w_overlap: float = 1.0,
        w_edge: float = 0.05,
        w_prox: float = 0.1,
        edge_sigma: float = 0.05,
        tv_eps: float = 0.1,
        target_momentum: float = 0.5,
        data_loss: str = "bce",
        logit_clip: float = 12.0,
        tile_batch: int = 8,
        gen_margin: int = 24,
        gen_max_box: int = 256,
        seg_margin: int = 32,
        mask_output: bool = True,
        return_init: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in ("gd", "adam"):
            raise ValueError(f"optimizer must be 'gd' or 'adam', got {optimizer!r}")
        if data_loss not in ("bce", "dice"):
            raise ValueError(f"data_loss must be 'bce' or 'dice', got {data_loss!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.generator = generator
        self.init_inferer = init_inferer or BreastTileInferer(roi_size=512, overlap=0.125, sw_batch_size=2)
        self.tile_size = int(tile_size)
        self.overlap = float(overlap)
        self.iterations, self.inner_steps = int(iterations), int(inner_steps)
        self.step_size, self.optimizer = float(step_size), optimizer
        self.n_samples, self.euler_steps = int(n_samples), int(euler_steps)
        self.seed_threshold, self.seed_radius = float(seed_threshold), int(seed_radius)
        self.fire_threshold = float(fire_threshold)
        self.restrict_radius = restrict_radius
        self.w_data, self.w_overlap, self.w_edge, self.w_prox = float(w_data), float(w_overlap), float(w_edge), float(w_prox)
        self.edge_sigma, self.tv_eps = float(edge_sigma), float(tv_eps)
        self.target_momentum = float(target_momentum)
        self.data_loss = data_loss
        self.logit_clip = float(logit_clip)
        self.tile_batch = max(1, int(tile_batch))
        self.gen_margin = int(gen_margin)
        self.gen_max_box = max(int(gen_max_box), 16)
        self.seg_margin = int(seg_margin)
        self.mask_output, self.return_init = mask_output, return_init
        self.seed = int(seed)
        self.history: list[dict[str, float]] = []
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ entry points
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        breast: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Initializer + TT-GPR on every image of the batch.

        Args:
            inputs: ``(B, 1, H, W)`` normalised images.
            network: the frozen segmentor (logits).
            args: unused (signature of ``BreastTileInferer``).
            breast: optional ``(B, 1, H, W)`` breast mask.
            kwargs: unused.

        Returns:
            ``(B, 1, H, W)`` probabilities in [0, 1] (``(B, 2, H, W)`` with ``return_init``).
        """
        if inputs.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) inputs, got shape {tuple(inputs.shape)}")
        outs = []
        for b in range(inputs.shape[0]):
            x = _plain(inputs[b : b + 1]).to(inputs.device)
            bm = None if breast is None else _plain(breast[b : b + 1]).to(inputs.device)
            p0 = self.initial_prob(x, network, bm)
            p = self.refine(x, network, p0, bm)
            outs.append(torch.cat([p, p0], 1) if self.return_init else p)
        return torch.cat(outs, 0)

    @torch.no_grad()
    def initial_prob(self, x: torch.Tensor, network: Callable[..., torch.Tensor], breast: torch.Tensor | None = None) -> torch.Tensor:
        """The initializer's probability map ``(1, 1, H, W)`` (``init_inferer`` with ``network``).

        Args:
            x: ``(1, 1, H, W)`` normalised image.
            network: the segmentor.
            breast: optional ``(1, 1, H, W)`` breast mask.
        """
        p = self.init_inferer(x, network, breast=breast)
        return _plain(p).to(x.device).clamp(0.0, 1.0)

    def _seg_logits(self, network: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Segmentor logits of ``(N, 1, t, t)`` tiles in batches of ``tile_batch`` (no grad)."""
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.tile_batch):
                y = network(x[i : i + self.tile_batch])
                outs.append(_plain(y).to(x.device)[:, :1])
        return torch.cat(outs, 0)

    def _tile_logits(
        self, network: Callable[..., torch.Tensor], canvas: torch.Tensor, tiles: Sequence[tuple[slice, slice]]
    ) -> torch.Tensor:
        """Segmentor logits of the tiles of ``canvas`` ``(1, 1, H, W)``, each computed on the tile
        grown by ``seg_margin`` pixels (replicate-padded at the image border) and cropped back, so
        that tile borders see the same context as the initializer's larger tiles."""
        m = self.seg_margin
        if m <= 0:
            return self._seg_logits(network, _gather(canvas, tiles))
        padded = F.pad(canvas, (m, m, m, m), mode="replicate")
        grown = [(slice(rs.start, rs.stop + 2 * m), slice(cs.start, cs.stop + 2 * m)) for rs, cs in tiles]
        return self._seg_logits(network, _gather(padded, grown))[..., m:-m, m:-m]

    def _project_canvas(self, xp: torch.Tensor, seeds: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``n_samples`` RF projections ``(S, 1, H, W)`` of the whole (padded) image, drawn once.

        Seeds are grouped into connected groups of their ``gen_margin`` neighbourhoods; the
        generator runs once per group on the group's bounding box (its context), conditioned on
        that group's seeds only, and the sampled MC layers are added to the observation. Tiles
        then crop the same projection, so overlapping tiles see the same sample.
        """
        assert self.generator is not None
        s_np = seeds[0, 0].cpu().numpy() > 0
        grown = ndimage.binary_dilation(s_np, structure=np.ones((3, 3), bool), iterations=max(self.gen_margin, 1))
        groups, n = ndimage.label(grown)
        layer = xp.new_zeros((self.n_samples, 1, *xp.shape[-2:]))
        h, w = xp.shape[-2:]
        box, m = self.gen_max_box, self.gen_margin
        for g, sl in enumerate(ndimage.find_objects(groups), start=1):
            # a group larger than gen_max_box (e.g. a dense field of seeds on a whole image) is
            # sampled core by core, each core seen with gen_margin pixels of context around it,
            # so that the generator's cost (and its attention) stays bounded
            single = sl[0].stop - sl[0].start <= box and sl[1].stop - sl[1].start <= box
            for r0 in range(sl[0].start, sl[0].stop, box):
                for c0 in range(sl[1].start, sl[1].stop, box):
                    r1, c1 = min(r0 + box, sl[0].stop), min(c0 + box, sl[1].stop)
                    if single:  # the group's own bounding box already holds gen_margin of context
                        wr, wc = sl
                    else:
                        wr = slice(max(r0 - m, 0), min(r1 + m, h))
                        wc = slice(max(c0 - m, 0), min(c1 + m, w))
                    own = torch.from_numpy(groups[wr, wc] == g).to(xp.device)
                    pts = seeds[..., wr, wc] * own
                    if not bool(pts.any()):
                        continue
                    ctx = xp[..., wr, wc]
                    win = self.generator.sample(ctx, pts, self.euler_steps, self.n_samples, gen, self.restrict_radius)[0]
                    cr, cc = slice(r0 - wr.start, r1 - wr.start), slice(c0 - wc.start, c1 - wc.start)
                    layer[..., r0:r1, c0:c1] += (win - ctx)[..., cr, cc]
        return xp + layer

    def _objective(
        self,
        z: torch.Tensor,
        z0: torch.Tensor,
        target: torch.Tensor,
        wx: torch.Tensor,
        wy: torch.Tensor,
        tiles: Sequence[tuple[slice, slice]],
        count: torch.Tensor,
        shape: tuple[int, int],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-pixel mean objective and its terms (see the class docstring)."""
        zero = z.new_zeros(())
        if self.w_data > 0:
            if self.data_loss == "bce":
                data = F.binary_cross_entropy_with_logits(z, target)
            else:
                p = torch.sigmoid(z)
                inter = (p * target).sum(dim=(1, 2, 3))
                den = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
                data = (1.0 - (2.0 * inter + 1.0) / (den + 1.0)).mean()
        else:
            data = zero
        if self.w_overlap > 0:
            avg = _place(z, tiles, shape) / count
            overlap = ((z - _gather(avg, tiles)) ** 2).mean()
        else:
            overlap = zero
        if self.w_edge > 0:
            dx = z[..., :, 1:] - z[..., :, :-1]
            dy = z[..., 1:, :] - z[..., :-1, :]
            eps = self.tv_eps
            tv = (wx * (torch.sqrt(dx * dx + eps * eps) - eps)).sum() + (wy * (torch.sqrt(dy * dy + eps * eps) - eps)).sum()
            edge = tv / z.numel()
        else:
            edge = zero
        prox = ((z - z0) ** 2).mean() if self.w_prox > 0 else zero
        total = self.w_data * data + self.w_overlap * overlap + self.w_edge * edge + self.w_prox * prox
        parts = {k: float(v.detach()) for k, v in (("data", data), ("overlap", overlap), ("edge", edge), ("prox", prox), ("objective", total))}
        return total, parts

    def refine(
        self,
        x: torch.Tensor,
        network: Callable[..., torch.Tensor],
        p0: torch.Tensor,
        breast: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """TT-GPR of an initial probability map.

        Args:
            x: ``(1, 1, H, W)`` normalised image.
            network: the frozen segmentor (logits).
            p0: ``(1, 1, H, W)`` initial probability (the initializer's map).
            breast: optional ``(1, 1, H, W)`` breast mask.

        Returns:
            ``(1, 1, H, W)`` refined probability in [0, 1].
        """
        x = _plain(x).reshape(1, 1, *x.shape[-2:]).to(p0.device)
        h, w = x.shape[-2:]
        p0 = _plain(p0).reshape(1, 1, h, w).to(x.device)
        bm = None if breast is None else (_plain(breast).reshape(1, 1, h, w).to(x.device) > 0).float()
        t = self.tile_size
        ph, pw = max(0, t - h), max(0, t - w)
        xp = F.pad(x, (0, pw, 0, ph), value=float(x.min())) if (ph or pw) else x
        p0p = F.pad(p0, (0, pw, 0, ph)) if (ph or pw) else p0
        bmp = None if bm is None else (F.pad(bm, (0, pw, 0, ph)) if (ph or pw) else bm)
        hp, wp = xp.shape[-2:]
        shape = (hp, wp)
        all_tiles = list(iter_tiles(shape, (t, t), self.overlap))
        seeds0 = extract_seeds(p0p, self.seed_threshold, self.seed_radius, bmp)
        tiles = []
        for rs, cs in all_tiles:
            if bmp is not None and not bool(bmp[..., rs, cs].any()):
                continue
            if self.fire_threshold <= 0 or float(p0p[..., rs, cs].max()) >= self.fire_threshold or bool(seeds0[..., rs, cs].any()):
                tiles.append((rs, cs))
        self.history = []
        self.last_stats = {"tiles_total": len(all_tiles), "tiles_active": len(tiles)}
        if not tiles:
            logger.info("TT-GPR: no active tile (nothing fires); returning the initial map")
            return p0
        gen = torch.Generator().manual_seed(self.seed)
        X = _gather(xp, tiles)
        z0 = self._tile_logits(network, xp, tiles).clamp(-self.logit_clip, self.logit_clip)
        s_obs = torch.sigmoid(z0)
        wx, wy = edge_weights(X, self.edge_sigma)
        count = _place(torch.ones_like(z0), tiles, shape)
        covered = count > 0
        count = count.clamp_min(1.0)
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.step_size) if self.optimizer == "adam" else None
        target: torch.Tensor | None = None
        self.last_stats["disagreement_start"] = tile_disagreement(z0, tiles, shape)
        logger.info("TT-GPR: %d of %d tiles active (%dx%d image)", len(tiles), len(all_tiles), h, w)
        for it in range(self.iterations):
            with torch.no_grad():
                pc = _place(torch.sigmoid(z), tiles, shape) / count
                cur = torch.where(covered, pc, p0p)
                seed_canvas = extract_seeds(cur, self.seed_threshold, self.seed_radius, bmp).float() * covered
                seeds = _gather(seed_canvas, tiles)
                surrogate = s_obs.clone()
                with_seed = torch.nonzero(seeds.flatten(1).any(1)).flatten()
                if self.generator is not None and with_seed.numel() > 0:
                    proj = self._project_canvas(xp, seed_canvas, gen)
                    sel = [tiles[k] for k in with_seed.tolist()]
                    acc = torch.zeros_like(surrogate[with_seed])
                    for j in range(self.n_samples):
                        acc += torch.sigmoid(self._tile_logits(network, proj[j : j + 1], sel))
                    surrogate[with_seed] = acc / self.n_samples
                rho = self.target_momentum
                target = surrogate if target is None else (1.0 - rho) * target + rho * surrogate
            with torch.enable_grad():
                first: dict[str, float] = {}
                parts: dict[str, float] = {}
                for step in range(self.inner_steps + 1):
                    total, parts = self._objective(z, z0, target, wx, wy, tiles, count, shape)
                    parts.update(iteration=it + 1, step=step)
                    self.history.append(dict(parts))
                    if step == 0:
                        first = parts
                    if step == self.inner_steps:
                        break
                    if opt is not None:
                        opt.zero_grad()
                        total.backward()
                        opt.step()
                    else:
                        (grad,) = torch.autograd.grad(total * z.numel(), z)
                        with torch.no_grad():
                            z -= self.step_size * grad
            logger.info(
                "TT-GPR iteration %d/%d: objective %.5f -> %.5f (data %.5f, overlap %.5f, edge %.5f, prox %.5f); "
                "%d seeds in %d tiles",
                it + 1, self.iterations, first["objective"], parts["objective"], parts["data"], parts["overlap"],
                parts["edge"], parts["prox"], int(seeds.sum()), int(with_seed.numel()),
            )
        with torch.no_grad():
            zf = z.detach()
            self.last_stats["disagreement_end"] = tile_disagreement(zf, tiles, shape)
            pc = _place(torch.sigmoid(zf), tiles, shape) / count
            out = torch.where(covered, pc, p0p)[..., :h, :w]
            if bm is not None and self.mask_output:
                out = out * bm
        return out.clamp(0.0, 1.0)


class TTGPRRefiner:
    """Refiner adapter ``(image, prob, breast) -> {"prob"}`` for ``MammogramInference`` / the study.

    Args:
        inferer: the TT-GPR inferer.
        network: the frozen segmentor (the initializer).
        device: torch device.
        use_given_prob: use the ``prob`` passed in as the initial map (``MammogramInference``
            passes the initializer's map); False recomputes it with ``inferer.initial_prob``
            (the study passes SegAI's map, which is not MC-GenRef's initializer).
    """

    def __init__(
        self,
        inferer: TTGPRInferer,
        network: torch.nn.Module,
        device: str | torch.device = "cpu",
        use_given_prob: bool = True,
    ) -> None:
        self.inferer, self.network = inferer, network
        self.device = torch.device(device)
        self.use_given_prob = use_given_prob

    def __call__(self, image: np.ndarray, prob: np.ndarray | None, breast: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Refine one image.

        Args:
            image: ``(H, W)`` normalised image.
            prob: ``(H, W)`` initial probability (see ``use_given_prob``).
            breast: optional ``(H, W)`` breast mask.
        """
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None].to(self.device)
        b = None if breast is None else torch.as_tensor(np.asarray(breast, dtype=np.float32))[None, None].to(self.device)
        self.network.eval()
        if self.use_given_prob and prob is not None:
            p0 = torch.as_tensor(np.asarray(prob, dtype=np.float32))[None, None].to(self.device)
        else:
            p0 = self.inferer.initial_prob(x, self.network, b)
        p = self.inferer.refine(x, self.network, p0, b)
        return {"prob": p[0, 0].detach().cpu().numpy().astype(np.float32)}


class MCGenRefMethods:
    """The two study rows ``mcgenref_init`` and ``mcgenref_ttgpr`` as study refiners.

    Both ignore the SegAI map the study passes in and run MC-GenRef's own synthetic-only
    initializer; the initial map of the last image is cached, so the two rows cost one
    initializer pass per case.

    Args:
        network: the MC-GenRef segmentor with weights.
        inferer: the TT-GPR inferer (its ``init_inferer`` makes the initial map).
        device: torch device.
    """

    def __init__(self, network: torch.nn.Module, inferer: TTGPRInferer, device: str | torch.device = "cpu") -> None:
        self.network, self.inferer = network, inferer
        self.device = torch.device(device)
        self._key: tuple | None = None
        self._p0: torch.Tensor | None = None

    def _initial(self, image: np.ndarray, breast: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        arr = np.asarray(image, dtype=np.float32)
        key = (id(image), arr.shape, float(arr[:: max(1, arr.shape[0] // 7), :: max(1, arr.shape[1] // 7)].sum()))
        x = torch.as_tensor(arr)[None, None].to(self.device)
        b = None if breast is None else torch.as_tensor(np.asarray(breast, dtype=np.float32))[None, None].to(self.device)
        if key != self._key or self._p0 is None:
            self.network.eval()
            self._p0 = self.inferer.initial_prob(x, self.network, b)
            self._key = key
        return x, self._p0, b

    def init(self, image: np.ndarray, prob: np.ndarray | None = None, breast: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``mcgenref_init``: the synthetic-only initializer's map.

        Args:
            image: ``(H, W)`` normalised image.
            prob: ignored (SegAI's map).
            breast: optional breast mask.
        """
        _, p0, _ = self._initial(image, breast)
        return {"prob": p0[0, 0].cpu().numpy().astype(np.float32)}

    def ttgpr(self, image: np.ndarray, prob: np.ndarray | None = None, breast: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``mcgenref_ttgpr``: initializer + TT-GPR.

        Args:
            image: ``(H, W)`` normalised image.
            prob: ignored (SegAI's map).
            breast: optional breast mask.
        """
        x, p0, b = self._initial(image, breast)
        p = self.inferer.refine(x, self.network, p0, b)
        return {"prob": p[0, 0].detach().cpu().numpy().astype(np.float32)}

    def refiners(self) -> dict[str, Callable[..., dict]]:
        """``{"mcgenref_init": ..., "mcgenref_ttgpr": ...}`` for ``MCStudy(extra_refiners=...)``."""
        return {"mcgenref_init": self.init, "mcgenref_ttgpr": self.ttgpr}


def build_study_methods(
    seg_ckpt_path: str | os.PathLike,
    rflow_ckpt_path: str | os.PathLike | None,
    network: torch.nn.Module | None = None,
    generator: SeedRFGenerator | None = None,
    ttgpr_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Callable[..., dict]]:
    """Study refiners of MC-GenRef, or ``{}`` (with a warning) when the segmentor weights are missing.

    Use as ``MCStudy(extra_refiners=build_study_methods(...))`` and add ``"mcgenref_init"`` /
    ``"mcgenref_ttgpr"`` to the study's ``methods``.

    Args:
        seg_ckpt_path: weights of the synthetic-only segmentor (``models/mcgenref_seg.pt``).
        rflow_ckpt_path: weights of the RF generator (``models/rflow.pt``); missing: TT-GPR runs
            without generative projections (warned).
        network: segmentor architecture (default ``SegAINet()``).
        generator: generator architecture (default ``SeedRFGenerator()``).
        ttgpr_kwargs: keyword arguments of :class:`TTGPRInferer`.
        device: torch device.
    """
    from bundle.networks import load_checkpoint
    from bundle.networks import SegAINet

    try:
        net = load_checkpoint(network if network is not None else SegAINet(), seg_ckpt_path, device)
    except (FileNotFoundError, RuntimeError) as e:
        logger.warning("MC-GenRef study rows unavailable: %s", e)
        return {}
    gen = load_generator(generator if generator is not None else SeedRFGenerator(), rflow_ckpt_path, device, required=False)
    inferer = TTGPRInferer(generator=gen, **dict(ttgpr_kwargs or {}))
    return MCGenRefMethods(net, inferer, device).refiners()


def mcgenref_refiner(
    method: str,
    seg_ckpt_path: str | os.PathLike = "models/mcgenref_seg.pt",
    rflow_ckpt_path: str | os.PathLike | None = "models/rflow.pt",
    ttgpr_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    network: torch.nn.Module | None = None,
    generator: SeedRFGenerator | None = None,
) -> Callable[..., dict]:
    """Factory of the registered methods ``mcgenref_init`` and ``mcgenref_ttgpr``.

    Args:
        method: ``"mcgenref_init"`` or ``"mcgenref_ttgpr"``.
        seg_ckpt_path: weights of the synthetic-only segmentor.
        rflow_ckpt_path: weights of the RF generator (TT-GPR).
        ttgpr_kwargs: keyword arguments of :class:`TTGPRInferer` (the one place they are set is
            ``mcgenref_ttgpr`` in the configs).
        device: torch device.
        network: segmentor architecture (default ``SegAINet()``).
        generator: generator architecture (default ``SeedRFGenerator()``).

    Raises:
        FileNotFoundError: when the segmentor weights are missing (the study lists the row as
            skipped with this reason).
    """
    methods = build_study_methods(seg_ckpt_path, rflow_ckpt_path, network, generator, ttgpr_kwargs, device)
    if not methods:
        raise FileNotFoundError(f"{seg_ckpt_path}: MC-GenRef segmentor weights not found")
    return methods[method]


def _register_methods() -> None:
    from functools import partial

    from bundle.refine import REFINERS, register_refiner

    if "mcgenref_init" not in REFINERS:
        register_refiner("mcgenref_init", partial(mcgenref_refiner, "mcgenref_init"), label="MC-GenRef init (synthetic-only)",
                         needs=(), operating_point=0.5, description="segmentor trained on synthetic MCs only; SegAI not used")
    if "mcgenref_ttgpr" not in REFINERS:
        register_refiner("mcgenref_ttgpr", partial(mcgenref_refiner, "mcgenref_ttgpr"), label="MC-GenRef TT-GPR",
                         needs=(), operating_point=0.5, description="the initializer refined by test-time generative posterior refinement")


_register_methods()


# ----------------------------------------------------------------------------------------------
# quick held-out evaluation on injected cases
# ----------------------------------------------------------------------------------------------
def _pixel_counts(prob: np.ndarray, truth: np.ndarray, region: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (prob >= threshold) & region
    t = truth & region
    tp = float((pred & t).sum())
    fp = float((pred & ~t).sum())
    fn = float((~pred & t).sum())
    tn = float((~pred & ~t & region).sum())
    comps, n = ndimage.label(t, structure=np.ones((3, 3), bool))
    hit = 0
    if n:
        hit = int(np.unique(comps[pred & t]).size - (1 if 0 in np.unique(comps[pred & t]) else 0))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "objects": float(n), "objects_hit": float(hit)}


def _summary(c: dict[str, float]) -> dict[str, float]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    rec = tp / max(tp + fn, 1.0)
    spec = tn / max(tn + fp, 1.0)
    return {
        "dice": 2 * tp / max(2 * tp + fp + fn, 1.0),
        "recall": rec,
        "fnr": 1.0 - rec,
        "precision": tp / max(tp + fp, 1.0),
        "bal_acc": 0.5 * (rec + spec),
        "g_mean": math.sqrt(max(rec * spec, 0.0)),
        "object_recall": c["objects_hit"] / max(c["objects"], 1.0),
        "fp_pixels": fp,
    }


def evaluate_injected(
    images: Sequence[tuple[np.ndarray, np.ndarray]],
    network: torch.nn.Module,
    inferer: TTGPRInferer,
    seed: int,
    crop: int = 256,
    crops_per_image: int = 4,
    threshold: float = 0.5,
    inject_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare the initializer and TT-GPR on injected crops of calcification-free images.

    For every ``(image, breast)`` pair (normalised, working grid) ``crops_per_image`` random breast
    crops get MCs from :class:`InjectSyntheticMCd` (seeded by ``seed``); both methods run on each
    crop and pixel counts are pooled over all crops.

    Args:
        images: normalised ``(H, W)`` images with their breast masks.
        network: the segmentor (initializer).
        inferer: the TT-GPR inferer.
        seed: seed of crops and injections (use one not used in training or tuning).
        crop: crop size.
        crops_per_image: crops per image.
        threshold: probability threshold of the masks.
        inject_kwargs: keyword arguments of :class:`InjectSyntheticMCd`.

    Returns:
        ``{"init": metrics, "ttgpr": metrics, "n_crops", "seconds_init", "seconds_ttgpr"}``.
    """
    import time

    rng = np.random.default_rng(seed)
    inj = InjectSyntheticMCd(keys="image", breast_key="breast", **dict(inject_kwargs or {}))
    inj.set_random_state(seed=int(seed))
    acc = {m: {k: 0.0 for k in ("tp", "fp", "fn", "tn", "objects", "objects_hit")} for m in ("init", "ttgpr")}
    times = {"init": 0.0, "ttgpr": 0.0}
    n_crops = 0
    network.eval()
    for image, breast in images:
        h, w = image.shape
        inner = ndimage.binary_erosion(breast > 0, iterations=crop // 4)
        cand = np.argwhere(inner[crop // 2 : h - crop // 2, crop // 2 : w - crop // 2])
        if cand.size == 0:
            continue
        for _ in range(crops_per_image):
            r, c = cand[int(rng.integers(len(cand)))]
            sl = (slice(r, r + crop), slice(c, c + crop))
            img_c = torch.as_tensor(image[sl].astype(np.float32))[None]
            br_c = torch.as_tensor((breast[sl] > 0).astype(np.float32))[None]
            d = inj({"image": img_c, "breast": br_c})
            x = _plain(d["image"])[None]
            b = br_c[None]
            truth = _plain(d["label"])[0].numpy() > 0.5
            region = b[0, 0].numpy() > 0
            t0 = time.perf_counter()
            p0 = inferer.initial_prob(x, network, b)
            t1 = time.perf_counter()
            p = inferer.refine(x, network, p0, b)
            t2 = time.perf_counter()
            times["init"] += t1 - t0
            times["ttgpr"] += t2 - t1
            for m, pm in (("init", p0), ("ttgpr", p)):
                cnt = _pixel_counts(pm[0, 0].detach().numpy(), truth, region, threshold)
                for k, v in cnt.items():
                    acc[m][k] += v
            n_crops += 1
    out: dict[str, Any] = {m: _summary(acc[m]) for m in acc}
    out["counts"] = acc
    out["n_crops"] = n_crops
    out["seconds_init"] = round(times["init"], 2)
    out["seconds_ttgpr"] = round(times["ttgpr"], 2)
    return out


def heldout_eval(
    seg_ckpt_path: str | os.PathLike,
    rflow_ckpt_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    phantom_seed: int,
    inject_seed: int,
    n_phantoms: int = 3,
    phantom_shape: Sequence[int] = (1024, 832),
    extra_datalists: Sequence[str] = (),
    extra_key: str = "test",
    crop: int = 256,
    crops_per_image: int = 6,
    threshold: float = 0.5,
    ttgpr_kwargs: Mapping[str, Any] | None = None,
    inject_kwargs: Mapping[str, Any] | None = None,
    generator_kwargs: Mapping[str, Any] | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """Initializer vs TT-GPR on injected crops of held-out negatives; results appended to ``results.jsonl``.

    Held-out negatives: ``n_phantoms`` calcification-free phantoms made with ``phantom_seed`` (pick
    one no other config uses) plus the ``extra_key`` section of ``extra_datalists`` (e.g. a real
    negative kept out of training). Tune on one seed pair, report on another.

    Args:
        seg_ckpt_path: segmentor weights.
        rflow_ckpt_path: generator weights (None: TT-GPR without projections).
        out_dir: working folder (phantoms, ``results.jsonl``).
        phantom_seed: seed of the held-out phantoms.
        inject_seed: seed of crops and injections.
        n_phantoms: number of phantoms.
        phantom_shape: phantom size.
        extra_datalists: more negative datalists.
        extra_key: their section.
        crop: crop size.
        crops_per_image: crops per image.
        threshold: mask threshold.
        ttgpr_kwargs: :class:`TTGPRInferer` keyword arguments.
        inject_kwargs: :class:`InjectSyntheticMCd` keyword arguments.
        generator_kwargs: :class:`SeedRFGenerator` keyword arguments.
        tag: a label stored with the result.
    """
    import json
    from pathlib import Path

    from bundle.data import mammogram_preprocessing
    from bundle.networks import load_checkpoint
    from bundle.networks import SegAINet
    from bundle.training import merge_datalists, prepare_phantom_data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dl = prepare_phantom_data(
        out / f"negatives_seed{int(phantom_seed)}", n_cases=n_phantoms, seed=phantom_seed, shape=phantom_shape,
        splits=(0, 0, n_phantoms), with_mcs=False,
    )
    items = merge_datalists([dl], "test") + merge_datalists(list(extra_datalists), extra_key)
    pre = mammogram_preprocessing()
    images = []
    for it in items:
        d = pre({"image": it["image"]})
        images.append((_plain(d["image"])[0].numpy(), _plain(d["breast"])[0].numpy()))
    net = load_checkpoint(SegAINet(), seg_ckpt_path)
    gen = None
    if rflow_ckpt_path:
        gen = load_generator(SeedRFGenerator(**dict(generator_kwargs or {})), rflow_ckpt_path)
    kw = dict(ttgpr_kwargs or {})
    kw.setdefault("init_inferer", BreastTileInferer(roi_size=crop, overlap=0.125))
    inferer = TTGPRInferer(generator=gen, **kw)
    res = evaluate_injected(images, net, inferer, inject_seed, crop, crops_per_image, threshold, inject_kwargs)
    res.update(
        tag=tag, phantom_seed=int(phantom_seed), inject_seed=int(inject_seed), n_images=len(images),
        ttgpr_params={k: v for k, v in kw.items() if k != "init_inferer"}, rflow=str(rflow_ckpt_path or ""),
    )
    with open(out / "results.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(res) + "\n")
    return res
