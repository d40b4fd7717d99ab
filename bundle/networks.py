"""Network factories used by the bundle configs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet

__all__ = ["SegAINet"]


class SegAINet(UNet):
    """SegAI: a small 2D MONAI UNet that maps a normalised mammogram tile to MC logits.

    Input: ``(B, 1, H, W)`` float32 (H, W multiples of 2**(len(channels)-1)).
    Output: ``(B, 1, H, W)`` logits; apply a sigmoid for the MC probability.

    Args:
        channels: feature channels per level.
        strides: down-sampling strides between levels.
        num_res_units: residual units per block.
        dropout: dropout probability.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return super().forward(x)
