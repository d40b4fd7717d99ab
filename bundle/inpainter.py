"""Mask-aware transformer inpainting network ("GenAI" of the two-stage refinement).

Networks layer (``docs/architecture.md``). A small re-implementation, written for this project, of
the ideas of MAT (Li et al., "MAT: Mask-Aware Transformer for Large Hole Image Inpainting", CVPR
2022): a convolutional head on the masked image, windowed (Swin-style, shifted) transformer blocks
whose attention only looks at *valid* tokens, a valid-token mask that grows stage by stage, and a
convolutional decoder. Its training masks and loss and the whole-image inference (tiles, crops)
are in :mod:`bundle.inpainting`.

Array conventions (see ``docs/architecture.md``): network tensors are ``(B, C, H, W)``;
``hole`` is 1 where pixels are unknown (to be inpainted) and 0 where they are valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskAwareInpainter", "MaskAwareSwinBlock", "smooth_fill"]

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
