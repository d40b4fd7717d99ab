"""Mask-aware transformer inpainting ("GenAI" of the two-stage refinement).

A small re-implementation, written for this project, of the ideas of MAT (Li et al., "MAT:
Mask-Aware Transformer for Large Hole Image Inpainting", CVPR 2022): a convolutional head on
the masked image, windowed (Swin-style, shifted) transformer blocks whose attention only looks
at *valid* tokens, a valid-token mask that grows stage by stage, and a convolutional decoder.
The network is trained only on calcification-free tissue (random free-form holes, see
:func:`random_inpaint_mask`) and, at inference, fills the pixels that SegAI marked as
calcification with "virtual normal" tissue (:func:`inpaint_tiles`).

Array conventions (see ``docs/architecture.md``): network tensors are ``(B, C, H, W)``;
``hole`` is 1 where pixels are unknown (to be inpainted) and 0 where they are valid.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_dst_type
from scipy import ndimage as ndi
from skimage.draw import line as draw_line
from torch import nn

from bundle.utils import tile_starts  # noqa: F401  (re-exported)

__all__ = [
    "MaskAwareInpainter",
    "MaskAwareSwinBlock",
    "random_inpaint_mask",
    "RandInpaintMaskd",
    "InpaintingLoss",
    "inpaint_crops",
    "inpaint_tiles",
    "plan_hole_crops",
    "smooth_fill",
    "tile_starts",
]

# additive attention bias for forbidden keys; finite, so that a row where every key is
# forbidden falls back to a uniform softmax instead of NaN.
_NEG = -1.0e4


# --------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------
def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C); H and W are multiples of ``ws``."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _window_reverse(x: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, ws * ws, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _shift_region_bias(h: int, w: int, ws: int, shift: int, device: torch.device) -> torch.Tensor:
    """Bias (nW, N, N) forbidding attention across the wrap-around seams of a cyclic shift."""
    region = torch.zeros(h, w, device=device)
    label = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            region[hs, wsl] = label
            label += 1
    rw = _window_partition(region[None, :, :, None], ws).squeeze(-1)  # (nW, N)
    same = rw[:, :, None] == rw[:, None, :]
    return torch.where(same, 0.0, _NEG)


class _WindowAttention(nn.Module):
    """Multi-head self attention inside a window with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        ws = window_size
        self.rel_bias = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (ws - 1)  # (2, N, N) in [0, 2ws-2]
        self.register_buffer("rel_index", rel[0] * (2 * ws - 1) + rel[1], persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """x: (Bw, N, C); bias: additive mask broadcastable to (Bw, heads, N, N); index: the
        (N, N) relative-position index when the tokens are a sub-grid of a window."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        idx = self.rel_index if index is None else index
        rel = self.rel_bias[idx].permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=(rel + bias).to(x.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class MaskAwareSwinBlock(nn.Module):
    """Swin-style (shifted) window transformer block whose attention only uses valid tokens.

    A key token is attended to only when it is valid (its patch holds at least one known
    pixel, or it became valid by a mask update). In a window without any valid token, every
    key gets the same finite penalty, so the softmax falls back to uniform attention over the
    window (no NaN). The token grid is padded internally to a multiple of ``window_size``
    with invalid tokens; the shift is disabled when the grid is a single window.

    Args:
        dim: token feature size.
        num_heads: attention heads (``dim`` must be divisible by it).
        window_size: window side in tokens.
        shift: cyclic shift in tokens (0 or ``window_size // 2``).
        mlp_ratio: hidden size of the MLP relative to ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int = 0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: tokens ``(B, H, W, C)``.
            valid: valid-token mask ``(B, H, W)`` bool.

        Returns:
            tokens ``(B, H, W, C)``.
        """
        b, h, w, c = x.shape
        ws = self.window_size
        y = self.norm1(x)
        if h <= ws and w <= ws and h * w < ws * ws and bool(valid.flatten(1).any(1).all()):
            # the grid is a part of one window: attend among its own tokens only. Padding it
            # with invalid tokens would give the same result at up to (ws*ws)/(h*w) x the cost.
            sub = (torch.arange(h, device=x.device)[:, None] * ws + torch.arange(w, device=x.device)[None]).flatten()
            index = self.attn.rel_index[sub][:, sub]
            bias = torch.where(valid.reshape(b, 1, 1, h * w), 0.0, _NEG)
            y = self.attn(y.reshape(b, h * w, c), bias, index).reshape(b, h, w, c)
            x = x + y
            return x + self.mlp(self.norm2(x))
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            valid = F.pad(valid, (0, pw, 0, ph), value=False)
        hp, wp = h + ph, w + pw
        shift = self.shift if min(hp, wp) > ws else 0
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
            valid = torch.roll(valid, (-shift, -shift), dims=(1, 2))
        yw = _window_partition(y, ws)  # (B*nW, N, C)
        vw = _window_partition(valid[..., None].float(), ws).squeeze(-1) > 0.5  # (B*nW, N)
        bias = torch.where(vw, 0.0, _NEG)[:, None, None, :]  # (B*nW, 1, 1, N)
        if shift:
            region = _shift_region_bias(hp, wp, ws, shift, x.device)  # (nW, N, N)
            bias = bias + region.repeat(b, 1, 1)[:, None]
        yw = self.attn(yw, bias)
        y = _window_reverse(yw, ws, b, hp, wp)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


def smooth_fill(x: torch.Tensor, hole: torch.Tensor, max_levels: int = 12) -> torch.Tensor:
    """Fill ``hole`` with a smooth interpolation of the known pixels (push-pull pyramid).

    Known pixels and their weights are averaged 2 x 2 level by level ("push") until every
    coarse pixel has support; going back up ("pull"), each level keeps its own
    normalised average where it has known support and takes the upsampled coarser fill
    elsewhere. Small holes get the mean of their rim, large ones a smooth membrane-like
    fill. No parameters; differentiable; known pixels are returned unchanged.

    Args:
        x: ``(B, C, H, W)`` image.
        hole: ``(B, 1, H, W)``, > 0.5 = unknown.
        max_levels: pyramid levels at most (the pyramid stops at a side of 1 or 2 pixels).

    Returns:
        ``(B, C, H, W)`` image equal to ``x`` outside the hole.
    """
    known = (hole <= 0.5).to(x.dtype)
    vals, wts = [x * known], [known]
    # the pyramid always goes down to a side of 1 or 2 pixels: levels below the first fully
    # supported one do not change the result (they are only used where a level has no support),
    # and a fixed depth keeps the function free of data-dependent control flow (traceable)
    for _ in range(max_levels):
        if min(vals[-1].shape[-2:]) < 2:
            break
        vals.append(F.avg_pool2d(vals[-1], 2, ceil_mode=True))
        wts.append(F.avg_pool2d(wts[-1], 2, ceil_mode=True))
    # coarsest level: its own average where supported, else the image's known mean (0 if none)
    mean = (x * known).flatten(2).sum(-1) / known.flatten(2).sum(-1).clamp_min(1.0)
    level = torch.where(wts[-1] > 0, vals[-1] / wts[-1].clamp_min(1e-8), mean[..., None, None].expand_as(vals[-1]))
    for v, w in zip(reversed(vals[:-1]), reversed(wts[:-1])):
        up = F.interpolate(level, size=v.shape[-2:], mode="bilinear", align_corners=False)
        level = torch.where(w > 0, v / w.clamp_min(1e-8), up)
    return torch.where(hole > 0.5, level, x)


def _grow(valid: torch.Tensor) -> torch.Tensor:
    """Mask update: dilate a (B, H, W) bool token mask by one token (3 x 3)."""
    return F.max_pool2d(valid[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0.5


class MaskAwareInpainter(nn.Module):
    """Small mask-aware transformer inpainter (MAT-like), U-shaped over token stages.

    Pipeline: ``(image * (1 - hole), hole)`` -> two 3x3 convs at full resolution ->
    ``patch_size`` x ``patch_size`` strided conv stem (tokens) -> stages of
    :class:`MaskAwareSwinBlock` (stage ``i`` has ``embed_dim * 2**i`` features at
    ``1 / (patch_size * 2**i)`` resolution, a 2x2 strided conv merges tokens between stages)
    -> pixel-shuffle decoder with skip connections -> full-resolution conv refinement.
    The valid-token mask starts as "patch holds at least one known pixel", is dilated by one
    token after each stage (MAT's mask updating) and max-pooled at token merging.

    The network never sees the pixel values inside the hole (they are set to 0 before the
    head), and the output keeps the known pixels exactly:
    ``out = where(hole, prediction, image)``. With ``residual_fill`` the hole is first filled
    by :func:`smooth_fill` (an extra input channel) and the network predicts only the texture
    on top of that fill (the last layer starts at zero, so an untrained network already gives
    a smooth interpolation and training adds what interpolation cannot).

    Input ``H``, ``W`` should be multiples of ``patch_size * window_size`` (32 by default;
    then no compute is spent on padding when the deeper token grids also fill whole
    windows, e.g. 128). Any other size works: the image is padded internally to a multiple
    of ``patch_size * 2 ** (len(depths) - 1)`` (edge replication of the masked image and of
    the hole), each block pads its token grid to whole windows with invalid tokens, and the
    output is cropped back.

    Args:
        in_channels: image channels.
        embed_dim: token features of the first stage (doubled at each further stage).
        depths: number of transformer blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window side, in tokens.
        patch_size: side of the pixel patch that makes one token.
        mlp_ratio: MLP hidden size relative to the token size.
        head_channels: channels of the full-resolution conv head/refinement
            (default ``embed_dim // 2``).
        residual_fill: predict a residual over :func:`smooth_fill` (see above).
    """

    def __init__(
        self,
        in_channels: int = 1,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2),
        num_heads: Sequence[int] = (3, 3),
        window_size: int = 8,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        head_channels: int | None = None,
        residual_fill: bool = True,
    ) -> None:
        super().__init__()
        self.residual_fill = bool(residual_fill)
        if len(depths) != len(num_heads) or len(depths) == 0:
            raise ValueError("depths and num_heads must be non-empty and of equal length.")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.window_size = window_size
        self.n_stages = len(depths)
        c0 = head_channels or max(embed_dim // 2, 8)
        dims = [embed_dim * 2**i for i in range(self.n_stages)]
        self.head = nn.Sequential(
            nn.Conv2d(in_channels * (2 if self.residual_fill else 1) + 1, c0, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c0, c0, 3, padding=1),
            nn.GELU(),
        )
        self.stem = nn.Conv2d(c0, dims[0], patch_size, stride=patch_size)
        self.stem_norm = nn.LayerNorm(dims[0])
        self.stages = nn.ModuleList(
            nn.ModuleList(
                MaskAwareSwinBlock(
                    dims[i], num_heads[i], window_size, shift=0 if j % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio
                )
                for j in range(depths[i])
            )
            for i in range(self.n_stages)
        )
        self.merges = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 2, stride=2) for i in range(self.n_stages - 1))
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i + 1], dims[i] * 4, 1), nn.PixelShuffle(2)) for i in range(self.n_stages - 1)
        )
        self.fuses = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * dims[i], dims[i], 3, padding=1), nn.GELU()) for i in range(self.n_stages - 1)
        )
        self.to_pixels = nn.Sequential(nn.Conv2d(dims[0], c0 * patch_size**2, 1), nn.PixelShuffle(patch_size))
        self.refine = nn.Sequential(
            nn.Conv2d(2 * c0, c0, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c0, c0, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c0, in_channels, 3, padding=1),
        )
        self.apply(self._init_weights)
        if self.residual_fill:
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        """Pixel padding multiple: token merging needs an even token grid at each stage."""
        return self.patch_size * 2 ** (self.n_stages - 1)

    def forward(self, x: torch.Tensor, hole: torch.Tensor | None = None, composite: bool = True) -> torch.Tensor:
        """Inpaint ``x`` where ``hole`` is set.

        Args:
            x: image ``(B, in_channels, H, W)``; or, when ``hole`` is None,
                ``(B, in_channels + 1, H, W)`` with the hole as the last channel (handy for
                a trainer that passes a single input tensor).
            hole: ``(B, 1, H, W)``, 1 (or > 0.5) = unknown pixel to fill, 0 = known.
            composite: True returns ``where(hole, prediction, x)``; False returns the raw
                prediction everywhere (used for training with a valid-region loss term).

        Returns:
            ``(B, in_channels, H, W)`` tensor.
        """
        if hole is None:
            x, hole = x[:, : self.in_channels], x[:, self.in_channels :]
        if hole.shape[1] != 1:
            raise ValueError(f"hole must have one channel, got shape {tuple(hole.shape)}.")
        hole_b = hole > 0.5
        xm = torch.where(hole_b, torch.zeros((), dtype=x.dtype, device=x.device), x)  # never see hole pixels
        h, w = x.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        holef = hole_b.to(x.dtype)
        if ph or pw:
            xm_p = F.pad(xm, (0, pw, 0, ph), mode="replicate")
            hole_p = F.pad(holef, (0, pw, 0, ph), mode="replicate")
        else:
            xm_p, hole_p = xm, holef
        fill = smooth_fill(xm_p, hole_p) if self.residual_fill else None
        f0 = self.head(torch.cat([xm_p, hole_p] if fill is None else [xm_p, hole_p, fill], dim=1))
        t = self.stem(f0).permute(0, 2, 3, 1)  # (B, h, w, C)
        t = self.stem_norm(t)
        valid = F.max_pool2d(1.0 - hole_p, self.patch_size)[:, 0] > 0.5  # patch holds a known pixel
        skips = []
        for i, blocks in enumerate(self.stages):
            for blk in blocks:
                t = blk(t, valid)
            valid = _grow(valid)
            if i < self.n_stages - 1:
                skips.append(t)
                t = self.merges[i](t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                valid = F.max_pool2d(valid[:, None].float(), 2)[:, 0] > 0.5
        y = t.permute(0, 3, 1, 2)
        for i in reversed(range(self.n_stages - 1)):
            y = self.ups[i](y)
            y = self.fuses[i](torch.cat([y, skips[i].permute(0, 3, 1, 2)], dim=1))
        y = self.to_pixels(y)
        pred = self.refine(torch.cat([y, f0], dim=1))
        if fill is not None:
            pred = pred + fill
        pred = pred[..., :h, :w]
        if not composite:
            return pred
        return torch.where(hole_b, pred, x)


# --------------------------------------------------------------------------------------
# training masks
# --------------------------------------------------------------------------------------
def _draw_stroke(mask: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Draw one free-form brush stroke (4-18 vertices) into the bool ``mask`` in place."""
    h, w = mask.shape
    size = min(h, w)
    n_vertex = int(rng.integers(4, 19))
    width = max(1.0, rng.uniform(12.0, 48.0) * scale)
    y, x = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
    angle = rng.uniform(0, 2 * np.pi)
    pts = [(int(round(y)), int(round(x)))]
    for _ in range(n_vertex - 1):
        angle += rng.uniform(-np.pi / 2, np.pi / 2)
        length = rng.uniform(0.03, 0.15) * size + 1.0
        y = float(np.clip(y + length * np.sin(angle), 0, h - 1))
        x = float(np.clip(x + length * np.cos(angle), 0, w - 1))
        pts.append((int(round(y)), int(round(x))))
    skel = np.zeros_like(mask)
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
        rr, cc = draw_line(y0, x0, y1, x1)
        skel[rr, cc] = True
    r = width / 2.0
    ys, xs = np.nonzero(skel)
    pad = int(math.ceil(r)) + 1
    r0, r1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)
    c0, c1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)
    dist = ndi.distance_transform_edt(~skel[r0:r1, c0:c1])
    mask[r0:r1, c0:c1] |= dist <= r


def _draw_box(mask: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> None:
    """Draw one axis-aligned box with sides in ``[lo, hi] * side`` into ``mask`` in place."""
    h, w = mask.shape
    bh = max(1, int(round(rng.uniform(lo, hi) * h)))
    bw = max(1, int(round(rng.uniform(lo, hi) * w)))
    r = int(rng.integers(0, h - bh + 1))
    c = int(rng.integers(0, w - bw + 1))
    mask[r : r + bh, c : c + bw] = True


def random_inpaint_mask(
    shape: Sequence[int],
    rng: np.random.Generator,
    hole_ratio: Sequence[float] = (0.05, 0.4),
    max_strokes: int = 9,
    max_small_boxes: int = 5,
    max_large_boxes: int = 3,
    max_tries: int = 200,
) -> np.ndarray:
    """Random free-form training hole: brush strokes plus boxes (MAT-style generator).

    Each draw has 1..``max_strokes`` brush strokes (4-18 vertices, random turning angles,
    widths 12-48 px scaled by ``min(H, W) / 512``), 0..``max_small_boxes`` boxes with sides
    of 5-50 % of the patch and, with probability 0.5, 0..``max_large_boxes`` boxes with sides
    of 25-100 % of the patch. Draws are repeated until the hole fraction lies in
    ``hole_ratio`` (inclusive); after ``max_tries`` failures a single box with a hole
    fraction drawn uniformly from the range is returned.

    Args:
        shape: ``(H, W)``.
        rng: numpy random generator (the only source of randomness).
        hole_ratio: ``(min, max)`` accepted hole fraction.
        max_strokes: most brush strokes per draw.
        max_small_boxes: most small boxes per draw.
        max_large_boxes: most large boxes per draw.
        max_tries: draws before the fallback box.

    Returns:
        ``(H, W)`` uint8 array, 1 = hole.
    """
    h, w = int(shape[-2]), int(shape[-1])
    lo, hi = float(hole_ratio[0]), float(hole_ratio[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"hole_ratio must satisfy 0 <= min <= max <= 1, got {hole_ratio}.")
    scale = min(h, w) / 512.0
    for _ in range(max_tries):
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(1, max_strokes + 1))):
            _draw_stroke(mask, rng, scale)
        for _ in range(int(rng.integers(0, max_small_boxes + 1))):
            _draw_box(mask, rng, 0.05, 0.5)
        if rng.random() < 0.5:
            for _ in range(int(rng.integers(0, max_large_boxes + 1))):
                _draw_box(mask, rng, 0.25, 1.0)
        if lo <= mask.mean() <= hi:
            return mask.astype(np.uint8)
    target = rng.uniform(lo, hi) * h * w
    bh = int(np.clip(round(math.sqrt(target * h / w)), 1, h))
    bw = int(np.clip(round(target / bh), 1, w))
    mask = np.zeros((h, w), dtype=np.uint8)
    r, c = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    mask[r : r + bh, c : c + bw] = 1
    return mask


class RandInpaintMaskd(Randomizable, MapTransform):
    """Add a random free-form training hole (:func:`random_inpaint_mask`) to a dictionary.

    The hole has the spatial shape of ``data[keys[0]]`` (``(C, H, W)``) and is stored as a
    ``(1, H, W)`` float32 array of the same kind (tensor / MetaTensor / numpy) under
    ``hole_key``. The image itself is not modified: the network masks it.

    Args:
        keys: image key(s); the first gives the shape.
        hole_key: output key.
        hole_ratio: ``(min, max)`` accepted hole fraction.
        allow_missing_keys: MONAI's usual flag.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        hole_key: str = "hole",
        hole_ratio: Sequence[float] = (0.05, 0.4),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.hole_key = hole_key
        self.hole_ratio = tuple(hole_ratio)
        self._mask: np.ndarray | None = None

    def randomize(self, data: Sequence[int]) -> None:
        """Draw a hole of spatial shape ``data`` (``(H, W)``)."""
        gen = np.random.default_rng(int(self.R.randint(0, 2**31 - 1)))
        self._mask = random_inpaint_mask(data, gen, self.hole_ratio)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = next(iter(self.key_iterator(d)), None)
        if key is None:
            return d
        img = d[key]
        self.randomize(tuple(img.shape[-2:]))
        hole = self._mask[None].astype(np.float32)  # type: ignore[index]
        dtype = torch.float32 if isinstance(img, torch.Tensor) else np.float32
        d[self.hole_key] = convert_to_dst_type(hole, img, dtype=dtype)[0]
        return d


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------
class InpaintingLoss(nn.Module):
    """Reconstruction loss for inpainting training.

    ``loss = w_hole * L1_hole + w_valid * L1_valid + w_grad * L1_grad`` with

    - ``L1_hole``: mean absolute error over hole pixels,
    - ``L1_valid``: mean absolute error over known pixels (0 when the prediction is
      composited; train with ``composite=False`` to use it),
    - ``L1_grad``: mean absolute error of the horizontal and vertical finite differences
      over pixel pairs touching the hole (averaged over the two directions).

    Each mean is over the pixels of its region (at least 1), so the weights do not depend on
    the hole fraction.

    Args:
        w_hole: weight of the hole term.
        w_valid: weight of the valid-region term.
        w_grad: weight of the gradient term.
    """

    def __init__(self, w_hole: float = 6.0, w_valid: float = 1.0, w_grad: float = 1.0) -> None:
        super().__init__()
        self.w_hole, self.w_valid, self.w_grad = float(w_hole), float(w_valid), float(w_grad)

    @staticmethod
    def _masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.expand_as(err)
        return (err * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, hole: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            pred: ``(B, C, H, W)`` network output.
            target: ``(B, C, H, W)`` original image; or, when ``hole`` is None,
                ``(B, C + 1, H, W)`` with the hole as last channel.
            hole: ``(B, 1, H, W)``, 1 = hole.

        Returns:
            scalar tensor.
        """
        if hole is None:
            target, hole = target[:, :-1], target[:, -1:]
        holef = (hole > 0.5).to(pred.dtype)
        err = (pred - target).abs()
        loss = self.w_hole * self._masked_mean(err, holef) + self.w_valid * self._masked_mean(err, 1.0 - holef)
        if self.w_grad:
            d = pred - target
            gx = (d[..., :, 1:] - d[..., :, :-1]).abs()
            gy = (d[..., 1:, :] - d[..., :-1, :]).abs()
            mx = torch.maximum(holef[..., :, 1:], holef[..., :, :-1])
            my = torch.maximum(holef[..., 1:, :], holef[..., :-1, :])
            loss = loss + self.w_grad * 0.5 * (self._masked_mean(gx, mx) + self._masked_mean(gy, my))
        return loss


# --------------------------------------------------------------------------------------
# whole-image inference
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_no_grad(net: Any) -> Iterator[None]:
    """Run ``net`` in eval mode without gradients; a module's training mode is restored."""
    was_training = isinstance(net, nn.Module) and net.training
    if isinstance(net, nn.Module):
        net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            net.train()


def _fill_inputs(image: Any, hole: Any, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked CPU ``(image, hole)`` and copies padded to at least ``side`` in each direction
    (image by edge replication, hole with False)."""
    img = torch.as_tensor(image, dtype=torch.float32).detach().cpu()
    hl = torch.as_tensor(hole).detach().cpu().bool()
    if img.ndim != 2 or hl.shape != img.shape:
        raise ValueError(f"image and hole must be (H, W) of equal shape, got {tuple(img.shape)} and {tuple(hl.shape)}.")
    ph, pw = max(side - img.shape[0], 0), max(side - img.shape[1], 0)
    if not (ph or pw):
        return img, hl, img, hl
    return img, hl, F.pad(img[None, None], (0, pw, 0, ph), mode="replicate")[0, 0], F.pad(hl, (0, pw, 0, ph), value=False)


def inpaint_tiles(
    net: nn.Module | Any,
    image: torch.Tensor,
    hole: torch.Tensor,
    tile: int = 128,
    overlap: float = 0.25,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Virtual normal image: inpaint ``hole`` of a whole image tile by tile.

    Tiles of ``tile x tile`` lie on a grid with ``overlap`` (border tiles shifted inward;
    an image smaller than a tile is padded by edge replication, the padding counting as
    known pixels). Only tiles that contain hole pixels go through ``net``; overlapping
    predictions are averaged (sum of tile outputs / number of tiles covering the pixel,
    the seed's Eqs. 4-5). The result equals ``image`` exactly outside the hole.

    Args:
        net: callable ``net(x, hole) -> (b, 1, tile, tile)`` such as
            :class:`MaskAwareInpainter`. A module is put in eval mode for the call and its
            mode restored afterwards.
        image: ``(H, W)`` float image (torch or numpy).
        hole: ``(H, W)`` bool (or 0/1) mask, True = fill.
        tile: tile side in pixels.
        overlap: overlap fraction of neighbouring tiles, in [0, 1).
        batch_size: tiles per network call.
        device: device the network runs on.

    Returns:
        ``(H, W)`` float32 CPU tensor.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    img, hl, img_p, hl_p = _fill_inputs(image, hole, tile)
    if not bool(hl.any()):
        return img.clone()
    h, w = img.shape
    hp, wp = img_p.shape
    boxes = [
        (r, c)
        for r in tile_starts(hp, tile, overlap)
        for c in tile_starts(wp, tile, overlap)
        if bool(hl_p[r : r + tile, c : c + tile].any())
    ]
    acc = torch.zeros_like(img_p)
    cnt = torch.zeros_like(img_p)
    with _eval_no_grad(net):
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i : i + batch_size]
            xb = torch.stack([img_p[r : r + tile, c : c + tile] for r, c in chunk])[:, None]
            hb = torch.stack([hl_p[r : r + tile, c : c + tile] for r, c in chunk])[:, None].float()
            out = net(xb.to(device), hb.to(device))
            out = torch.as_tensor(out).detach().float().cpu()[:, 0]
            for (r, c), o in zip(chunk, out):
                acc[r : r + tile, c : c + tile] += o
                cnt[r : r + tile, c : c + tile] += 1.0
    filled = acc / cnt.clamp_min(1.0)
    return torch.where(hl_p, filled, img_p)[:h, :w].contiguous()


def _interior(start: int, size: int, length: int, context: int) -> tuple[int, int]:
    """Interior of a crop ``[start, start + size)`` along an axis of ``length``: ``context``
    pixels are shed on each side, except on a side that lies on the image border."""
    lo = start if start <= 0 else start + context
    hi = start + size if start + size >= length else start + size - context
    return lo, hi


def _place(centre: float, size: int, length: int) -> int:
    """Start of a ``size`` crop centred on ``centre``, shifted inside ``[0, length)``."""
    return int(min(max(int(round(centre - size / 2.0)), 0), max(length - size, 0)))


def plan_hole_crops(
    hole: np.ndarray, crop_sizes: Sequence[int] = (32, 64), context: int = 8, tile: int = 128, overlap: float = 0.25
) -> list[tuple[int, int, int]]:
    """Square crops ``(row, col, size)`` whose interiors cover every hole pixel.

    Hole pixels are grouped into 8-connected components. Each component whose bounding box
    is not already inside the interior of an earlier crop gets one crop of the smallest size
    in ``crop_sizes`` whose interior (the crop less ``context`` pixels on each side that is
    not on the image border) holds the box, centred on the box. A component too large for
    every size is covered by a grid of ``tile`` crops with ``overlap`` over its box widened by
    ``context``. Cost therefore follows the number and size of the holes, not the image size.

    Args:
        hole: ``(H, W)`` bool, True = fill. Should be at least ``max(crop_sizes, tile)`` in
            both sides (the caller pads smaller images).
        crop_sizes: increasing crop sides to try for single components.
        context: known pixels kept around the interior of each crop.
        tile: side of the grid crops of large components.
        overlap: overlap fraction of those grid crops; ``tile * (1 - overlap)`` must be at
            most ``tile - 2 * context`` so that their interiors tile the box.

    Returns:
        a list of ``(row, col, size)``.
    """
    h, w = hole.shape
    sizes = sorted(int(s) for s in crop_sizes)
    if any(s <= 2 * context for s in sizes + [tile]):
        raise ValueError(f"every crop size must exceed 2 * context = {2 * context}, got {sizes} and tile {tile}.")
    stride = max(int(tile * (1.0 - overlap)), 1)
    if stride > tile - 2 * context:
        raise ValueError(f"tile {tile} with overlap {overlap} leaves gaps between interiors for context {context}.")
    lab, _ = ndi.label(hole, structure=np.ones((3, 3), dtype=bool))
    crops: list[tuple[int, int, int]] = []
    covered = np.zeros((h, w), dtype=bool)  # union of the interiors so far
    for sl in ndi.find_objects(lab):
        if sl is None:
            continue
        r0, r1, c0, c1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if covered[r0:r1, c0:c1].all():
            continue
        placed = False
        for s in sizes:
            r, c = _place((r0 + r1) / 2.0, s, h), _place((c0 + c1) / 2.0, s, w)
            ir0, ir1 = _interior(r, s, h, context)
            ic0, ic1 = _interior(c, s, w, context)
            if ir0 <= r0 and r1 <= ir1 and ic0 <= c0 and c1 <= ic1:
                crops.append((r, c, s))
                covered[ir0:ir1, ic0:ic1] = True
                placed = True
                break
        if placed:
            continue
        br0, br1 = max(r0 - context, 0), min(r1 + context, h)
        bc0, bc1 = max(c0 - context, 0), min(c1 + context, w)
        rs = [min(br0 + o, max(h - tile, 0)) for o in tile_starts(br1 - br0, tile, overlap)] if br1 - br0 > tile else [_place((br0 + br1) / 2.0, tile, h)]
        cs = [min(bc0 + o, max(w - tile, 0)) for o in tile_starts(bc1 - bc0, tile, overlap)] if bc1 - bc0 > tile else [_place((bc0 + bc1) / 2.0, tile, w)]
        for r in rs:
            for c in cs:
                crops.append((r, c, tile))
                ir0, ir1 = _interior(r, tile, h, context)
                ic0, ic1 = _interior(c, tile, w, context)
                covered[ir0:ir1, ic0:ic1] = True
    return crops


def inpaint_crops(
    net: nn.Module | Any,
    image: torch.Tensor,
    hole: torch.Tensor,
    crop_sizes: Sequence[int] = (32, 64),
    context: int = 8,
    tile: int = 128,
    overlap: float = 0.25,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Virtual normal image: inpaint ``hole`` in small crops centred on the holes.

    The fast path of the refinement. :func:`plan_hole_crops` places the crops; crops of
    equal size go through ``net`` in batches; each crop's prediction counts only in its
    interior (``context`` known pixels are kept on every side that is not the image border),
    and where interiors overlap the predictions are averaged (the seed's Eqs. 4-5). An image
    smaller than ``tile`` is padded by edge replication (padding counts as known). The result
    equals ``image`` exactly outside the hole.

    Args:
        net: callable ``net(x, hole) -> (b, 1, s, s)`` such as :class:`MaskAwareInpainter`
            (crop sides must be multiples of its ``size_multiple``). A module is put in eval
            mode for the call and its mode restored afterwards.
        image: ``(H, W)`` float image (torch or numpy).
        hole: ``(H, W)`` bool (or 0/1) mask, True = fill.
        crop_sizes: crop sides for single hole components, smallest first.
        context: known pixels around each crop's interior.
        tile: grid crop side for components larger than every crop size.
        overlap: overlap fraction of those grid crops.
        batch_size: crops per network call.
        device: device the network runs on.

    Returns:
        ``(H, W)`` float32 CPU tensor.
    """
    img, hl, img_p, hl_p = _fill_inputs(image, hole, max(max(crop_sizes), tile))
    if not bool(hl.any()):
        return img.clone()
    h, w = img.shape
    hp, wp = img_p.shape
    crops = plan_hole_crops(hl_p.numpy(), crop_sizes=crop_sizes, context=context, tile=tile, overlap=overlap)
    acc = torch.zeros_like(img_p)
    cnt = torch.zeros_like(img_p)
    with _eval_no_grad(net):
        for size in sorted({s for _, _, s in crops}):
            same = [(r, c) for r, c, s in crops if s == size]
            for i in range(0, len(same), batch_size):
                chunk = same[i : i + batch_size]
                xb = torch.stack([img_p[r : r + size, c : c + size] for r, c in chunk])[:, None]
                hb = torch.stack([hl_p[r : r + size, c : c + size] for r, c in chunk])[:, None].float()
                out = torch.as_tensor(net(xb.to(device), hb.to(device))).detach().float().cpu()[:, 0]
                for (r, c), o in zip(chunk, out):
                    ir0, ir1 = _interior(r, size, hp, context)
                    ic0, ic1 = _interior(c, size, wp, context)
                    acc[ir0:ir1, ic0:ic1] += o[ir0 - r : ir1 - r, ic0 - c : ic1 - c]
                    cnt[ir0:ir1, ic0:ic1] += 1.0
    if bool((hl_p & (cnt == 0)).any()):  # cannot happen by construction; never return garbage
        raise RuntimeError("inpaint_crops: some hole pixels were not covered by any crop interior.")
    filled = acc / cnt.clamp_min(1.0)
    return torch.where(hl_p, filled, img_p)[:h, :w].contiguous()
