"""Training-time glue of MC-GenRef: synthetic MC injection, RF training pairs, the RF batch and a time limit.

Inference layer (``docs/architecture.md``); used by ``configs/train_mcgenref_seg.json`` and
``configs/train_rflow.json``. :class:`InjectSyntheticMCd` injects microcalcification (MC) clusters
into calcification-free (normalised) patches with :func:`bundle.phantom.inject_mcs`, giving exact
image / label / seed triples on the fly (the synthetic supervision of :mod:`bundle.mcgenref`);
:class:`MakeRFlowPaird` turns an injected sample into a training pair of
:class:`bundle.rflow.SeedRFGenerator`; :class:`RFlowPrepareBatch` makes an RF training step of a
batch for MONAI's ``SupervisedTrainer``; :class:`WallTimeLimit` stops a training loop after a wall
time budget.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from monai.transforms import MapTransform, RandomizableTransform

from bundle.rflow import extract_seeds, gaussian_blur, make_condition, plain_tensor, seed_neighbourhood

__all__ = ["InjectSyntheticMCd", "MakeRFlowPaird", "RFlowPrepareBatch", "WallTimeLimit"]

logger = logging.getLogger("mcref.mcgenref")


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
            arr = plain_tensor(img)
            if arr.ndim != 3 or arr.shape[0] != 1:
                raise ValueError(f"InjectSyntheticMCd expects a (1, H, W) image, got {tuple(arr.shape)}")
            base = arr[0].numpy().astype(np.float32)
            h, w = base.shape
            if self.breast_key is not None and self.breast_key in d:
                breast = plain_tensor(d[self.breast_key]).reshape(h, w).numpy() > 0
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
            img = plain_tensor(d[key])
            bg = plain_tensor(d[self.background_key])
            h, w = img.shape[-2:]
            layer = (img - bg).reshape(1, 1, h, w)
            context = bg.reshape(1, 1, h, w) + self._alpha * layer
            target = self.residual_scale * (1.0 - self._alpha) * layer
            seeds = (plain_tensor(d[self.seed_key]).reshape(1, 1, h, w) > 0).float()
            if self._n_sp > 0:
                busy = seed_neighbourhood(seeds, 4) > 0
                if self.label_key in d:
                    busy |= seed_neighbourhood(plain_tensor(d[self.label_key]).reshape(1, 1, h, w), 4) > 0
                allowed = ~busy
                if self.breast_key in d:
                    allowed &= plain_tensor(d[self.breast_key]).reshape(1, 1, h, w) > 0
                hp = context - gaussian_blur(context, self.context_sigma)
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
        x0 = plain_tensor(batchdata[self.target_key])
        cond = plain_tensor(batchdata[self.cond_key])
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

