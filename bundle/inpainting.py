"""Training and whole-image inference of the mask-aware inpainter ("GenAI" of the two-stage refinement).

The network, :class:`MaskAwareInpainter` (:mod:`bundle.inpainter`, networks layer), is trained
only on calcification-free tissue (random free-form holes, :func:`random_inpaint_mask` /
:class:`RandInpaintMaskd`, loss :class:`InpaintingLoss`) and, at inference, fills the pixels that
SegAI marked as calcification with "virtual normal" tissue (:func:`inpaint_tiles` on a tile grid,
:func:`inpaint_crops` on crops around the holes). This module is in the inference layer
(``docs/architecture.md``) and re-exports the network's names, so ``bundle.inpainting.X`` keeps
working in configs and scripts.

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

from bundle.clusters import pixel_components
from bundle.inpainter import MaskAwareInpainter, MaskAwareSwinBlock, smooth_fill
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
    # components and their bounding boxes, labelled sparsely (same order as ndi.label +
    # ndi.find_objects, at a cost that follows the hole, not the image)
    idx = np.flatnonzero(np.asarray(hole).ravel())
    comp, n = pixel_components(idx, (h, w), connectivity=2)
    rows, cols = np.divmod(idx, w)
    boxes = np.empty((n, 4), dtype=np.int64)
    boxes[:, 0] = boxes[:, 2] = np.iinfo(np.int64).max
    boxes[:, 1] = boxes[:, 3] = -1
    np.minimum.at(boxes[:, 0], comp, rows)
    np.maximum.at(boxes[:, 1], comp, rows)
    np.minimum.at(boxes[:, 2], comp, cols)
    np.maximum.at(boxes[:, 3], comp, cols)
    crops: list[tuple[int, int, int]] = []
    covered = np.zeros((h, w), dtype=bool)  # union of the interiors so far (allocated lazily)
    for rmin, rmax, cmin, cmax in boxes.tolist():
        r0, r1, c0, c1 = rmin, rmax + 1, cmin, cmax + 1
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
    # np.zeros is allocated lazily: only the pages under crop interiors are ever touched
    acc = torch.from_numpy(np.zeros(tuple(img_p.shape), dtype=np.float32))
    cnt = torch.from_numpy(np.zeros(tuple(img_p.shape), dtype=np.float32))
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
    hidx = torch.from_numpy(np.flatnonzero(hl_p.numpy().ravel()))
    n_hole = cnt.view(-1)[hidx]
    if bool((n_hole == 0).any()):  # cannot happen by construction; never return garbage
        raise RuntimeError("inpaint_crops: some hole pixels were not covered by any crop interior.")
    out = img_p.clone()
    out.view(-1)[hidx] = acc.view(-1)[hidx] / n_hole
    return out[:h, :w].contiguous()
