"""MC-GenRef's seed-conditioned rectified-flow (RF) generator, its seeds and its condition channels.

Networks layer (``docs/architecture.md``). :class:`SeedRFGenerator` (MONAI ``DiffusionModelUNet``,
trained with ``RFlowScheduler``) models the *MC layer* that completes a faint observation into a
full-contrast MC-bearing patch: given a sparse seed map (MC centre points) and the observed context
(the patch and its high-pass, :func:`make_condition`), it samples ``r`` with ``projection = context
+ r`` in a few Euler steps (:func:`euler_sample`) so that it runs on a CPU. The seed functions
(:func:`extract_seeds`, :func:`seeds_from_label`, :func:`render_seed_map`, :func:`seed_neighbourhood`)
define the generator's seed input and are shared by the training transforms
(:mod:`bundle.synthetic_training`) and TT-GPR (:mod:`bundle.ttgpr`). The method as a whole is
described in :mod:`bundle.mcgenref` and ``docs/mcgenref.md``.

RF convention of MONAI 1.6.1 (checked in ``tests/test_mcgenref.py``): ``add_noise`` returns
``(1 - t/T) * x0 + (t/T) * noise``, so ``t = T`` is pure noise, the network predicts the velocity
``v = x0 - noise`` and ``step`` moves ``x <- x + v * (t - t_next) / T`` towards ``t = 0``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from scipy import ndimage

__all__ = [
    "COND_CHANNELS",
    "plain_tensor",
    "gaussian_blur",
    "extract_seeds",
    "seeds_from_label",
    "render_seed_map",
    "seed_neighbourhood",
    "context_channels",
    "make_condition",
    "SeedRFGenerator",
    "euler_sample",
    "load_generator",
]

logger = logging.getLogger("mcref.mcgenref")

#: channels of the generator's condition: rendered seed map, context, context high-pass.
COND_CHANNELS = 3


# ----------------------------------------------------------------------------------------------
# small tensor helpers
# ----------------------------------------------------------------------------------------------
def plain_tensor(x: Any) -> torch.Tensor:
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


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
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
    p = plain_tensor(prob)
    p4, shape = _as4d(p)
    k = 2 * int(radius) + 1
    mx = F.max_pool2d(p4, k, stride=1, padding=int(radius))
    peaks = (p4 >= mx) & (p4 >= float(threshold))
    if mask is not None:
        m4, _ = _as4d(torch.broadcast_to(plain_tensor(mask).to(p.device), p.shape))
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
    lab = plain_tensor(label)
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
    p = plain_tensor(points)
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
    p4, shape = _as4d(plain_tensor(points))
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
    c = plain_tensor(context)
    return torch.cat([c, c - gaussian_blur(c, sigma)], dim=1)


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
