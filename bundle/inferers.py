"""Whole-mammogram inferers: tile-wise SegAI with overlap averaging (seed Eqs. 4-5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

from bundle.runtime import build_segai_runtime
from bundle.utils import iter_tiles, tile_starts  # noqa: F401  (re-exported)

__all__ = ["tile_starts", "iter_tiles", "BreastTileInferer"]


class BreastTileInferer(Inferer):
    """SegAI inference on a whole mammogram, tile by tile, averaged over overlaps.

    Tiles of ``roi_size`` are laid on a regular grid with the given overlap; tiles that hold
    fewer than ``min_breast_fraction`` breast pixels (at least one) are skipped, which saves
    most of the background. Each tile's sigmoid map is added to a sum image and a count image;
    the result is ``sum / count`` (the seed's Eqs. 4-5), 0 where no tile ran, and multiplied by
    the breast mask when one is given.

    Why not MONAI's own: ``SlidingWindowInferer`` runs every tile of the image, background
    included (on a 4084 x 3328 view it is the benchmark's anchor row, slower than this inferer:
    ``scripts/benchmark.py``); ``PatchInferer`` with ``SlidingWindowSplitter(filter_fn=...)`` and
    ``AvgMerger`` could skip the background too, but the filter sees one patch at a time after it
    is cut, while this loop decides on the breast mask's tile sums before cutting anything and
    batches only the tiles that run. The grid is :func:`bundle.utils.tile_starts`, shared with the
    inpainter's tiles.

    Args:
        roi_size: tile size (H, W) or an int for square tiles.
        overlap: fractional overlap between neighbouring tiles, in [0, 1).
        sw_batch_size: tiles per network call.
        min_breast_fraction: a tile runs when its breast fraction is above this value.
        sigmoid: apply a sigmoid to the network output (the network returns logits).
        mask_output: multiply the result by the breast mask when one is given.
        progress: show a progress bar over tiles.
        channels_last: run the network in channels-last memory layout (CPU convolutions often
            run faster; the network is converted once, in place).
        autocast_dtype: ``"bfloat16"`` runs the network under ``torch.autocast`` in bfloat16
            (the sum and count images stay float32); None: float32. Check the maps against
            float32 with ``scripts/benchmark.py --compare-bf16`` before using it.
        backend: ``"torch"`` (default) runs the ``network`` it is called with; ``"openvino"``
            runs SegAI's ONNX export (``onnx_path``) through OpenVINO on the CPU instead and
            ignores the ``network`` argument (:class:`bundle.runtime.OpenVINONetwork`, compiled
            once here; needs ``pip install -e .[openvino]``).
        onnx_path: the ONNX export for ``backend="openvino"`` (``models/model.onnx``).
    """

    def __init__(
        self,
        roi_size: int | Sequence[int] = 512,
        overlap: float = 0.125,
        sw_batch_size: int = 4,
        min_breast_fraction: float = 0.0,
        sigmoid: bool = True,
        mask_output: bool = True,
        progress: bool = False,
        channels_last: bool = False,
        autocast_dtype: str | None = None,
        backend: str = "torch",
        onnx_path: str | None = None,
    ) -> None:
        super().__init__()
        if backend != "torch" and autocast_dtype is not None:
            raise ValueError(f"autocast_dtype applies to the torch backend only, not to {backend!r}")
        self.backend = backend
        self.runtime = build_segai_runtime(backend, onnx_path)  # None for "torch"
        self.channels_last = bool(channels_last)
        if autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {autocast_dtype!r}")
        self.autocast_dtype = autocast_dtype
        self.roi_size = (roi_size, roi_size) if isinstance(roi_size, int) else tuple(int(s) for s in roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.min_breast_fraction = float(min_breast_fraction)
        self.sigmoid = sigmoid
        self.mask_output = mask_output
        self.progress = progress
        tile_starts(10, 5, self.overlap)  # validates overlap early

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args,
        breast: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Run ``network`` over the tiles of ``inputs``.

        Args:
            inputs: (B, C, H, W) normalised images.
            network: callable mapping (N, C, th, tw) to (N, K, th, tw) logits.
            args: extra positional arguments passed to ``network``.
            breast: optional (B, 1, H, W) breast mask; tiles without breast are skipped.
            kwargs: extra keyword arguments passed to ``network``.

        Returns:
            (B, K, H, W) float32 map (probabilities when ``sigmoid``).
        """
        if inputs.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) inputs, got shape {tuple(inputs.shape)}")
        b, _, h, w = inputs.shape
        th, tw = self.roi_size
        pad_h, pad_w = max(0, th - h), max(0, tw - w)
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        x = torch.nan_to_num(x.float())
        bm = None
        if breast is not None:
            bm = (breast.as_tensor() if hasattr(breast, "as_tensor") else breast).to(x.device).float()
            if bm.shape[-2:] != (h, w):
                raise ValueError(f"breast mask shape {tuple(bm.shape)} does not match image {(h, w)}")
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=float(x.min()))
            if bm is not None:
                bm = F.pad(bm, (0, pad_w, 0, pad_h))
        hp, wp = x.shape[-2:]
        out_sum: torch.Tensor | None = None
        count = torch.zeros((b, 1, hp, wp), dtype=torch.float32, device=x.device)
        tiles = []
        for i in range(b):
            for rs, cs in iter_tiles((hp, wp), (th, tw), self.overlap):
                if bm is not None:
                    frac = float(bm[i, :, rs, cs].mean())
                    if frac <= self.min_breast_fraction or not bool(bm[i, :, rs, cs].any()):
                        continue
                tiles.append((i, rs, cs))
        iterator = range(0, len(tiles), self.sw_batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="tiles", unit="batch", leave=False)
        if self.runtime is not None:
            network = self.runtime
        if self.channels_last and isinstance(network, torch.nn.Module):
            network.to(memory_format=torch.channels_last)
        amp = self.autocast_dtype is not None
        amp_dtype = getattr(torch, self.autocast_dtype) if amp else None
        for start in iterator:
            chunk = tiles[start : start + self.sw_batch_size]
            batch = torch.stack([x[i, :, rs, cs] for i, rs, cs in chunk])
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp):
                y = network(batch, *args, **kwargs)
            y = y.as_tensor() if hasattr(y, "as_tensor") else y
            y = torch.sigmoid(y.float()) if self.sigmoid else y.float()
            if out_sum is None:
                out_sum = torch.zeros((b, y.shape[1], hp, wp), dtype=torch.float32, device=x.device)
            for (i, rs, cs), yt in zip(chunk, y):
                out_sum[i, :, rs, cs] += yt
                count[i, :, rs, cs] += 1.0
        if out_sum is None:  # nothing to run: no breast at all
            out_sum = torch.zeros((b, 1, hp, wp), dtype=torch.float32, device=x.device)
        out = out_sum / count.clamp_min(1.0)
        out = out[..., :h, :w]
        if bm is not None and self.mask_output:
            out = out * (bm[..., :h, :w] > 0)
        return out
