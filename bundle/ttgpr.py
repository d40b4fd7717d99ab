"""TT-GPR: test-time generative posterior refinement of a segmentor's MC probability map.

Inference layer (``docs/architecture.md``). :class:`TTGPRInferer`: for ``K`` iterations, derive a
sparse seed from the current probability (local maxima above a threshold), draw seed-consistent RF
projections of the observed tiles (:class:`bundle.rflow.SeedRFGenerator`), run the frozen segmentor
on them to get surrogate targets and update the per-tile logits by gradient steps on data +
overlap-consistency + edge-aware smoothness + proximity terms. Only tiles where the initializer or
a seed fires are refined. The method as a whole is described in :mod:`bundle.mcgenref` and
``docs/mcgenref.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from scipy import ndimage

from bundle.inferers import BreastTileInferer, iter_tiles
from bundle.rflow import SeedRFGenerator, extract_seeds, plain_tensor

__all__ = ["edge_weights", "tile_disagreement", "TTGPRInferer"]

logger = logging.getLogger("mcref.mcgenref")


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
            x = plain_tensor(inputs[b : b + 1]).to(inputs.device)
            bm = None if breast is None else plain_tensor(breast[b : b + 1]).to(inputs.device)
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
        return plain_tensor(p).to(x.device).clamp(0.0, 1.0)

    def _seg_logits(self, network: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Segmentor logits of ``(N, 1, t, t)`` tiles in batches of ``tile_batch`` (no grad)."""
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.tile_batch):
                y = network(x[i : i + self.tile_batch])
                outs.append(plain_tensor(y).to(x.device)[:, :1])
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
        x = plain_tensor(x).reshape(1, 1, *x.shape[-2:]).to(p0.device)
        h, w = x.shape[-2:]
        p0 = plain_tensor(p0).reshape(1, 1, h, w).to(x.device)
        bm = None if breast is None else (plain_tensor(breast).reshape(1, 1, h, w).to(x.device) > 0).float()
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
