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

The RF convention of MONAI 1.6.1 that the generator follows is stated in :mod:`bundle.rflow`.

Layout (``docs/architecture.md``): the generator, seeds and condition channels live in
:mod:`bundle.rflow` (networks layer), the training transforms, RF batch and time limit in
:mod:`bundle.synthetic_training` and TT-GPR in :mod:`bundle.ttgpr` (inference layer). This module
(inference layer) holds the refiner adapters, registers the methods ``mcgenref_init`` and
``mcgenref_ttgpr`` of :data:`bundle.refine.REFINERS` when imported, runs the quick held-out
evaluation on injected crops (:func:`heldout_eval`, with its own pixel counts) and re-exports the
names of the other three modules, so ``bundle.mcgenref.X`` keeps working in configs and scripts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from bundle.inferers import BreastTileInferer
from bundle.rflow import (
    COND_CHANNELS,
    SeedRFGenerator,
    context_channels,
    euler_sample,
    extract_seeds,
    load_generator,
    make_condition,
    plain_tensor,
    render_seed_map,
    seed_neighbourhood,
    seeds_from_label,
)
from bundle.synthetic_training import InjectSyntheticMCd, MakeRFlowPaird, RFlowPrepareBatch, WallTimeLimit
from bundle.ttgpr import TTGPRInferer, edge_weights, tile_disagreement

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
            x = plain_tensor(d["image"])[None]
            b = br_c[None]
            truth = plain_tensor(d["label"])[0].numpy() > 0.5
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
        images.append((plain_tensor(d["image"])[0].numpy(), plain_tensor(d["breast"])[0].numpy()))
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
